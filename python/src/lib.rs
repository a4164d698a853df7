//! `einfuse._native`: the Python extension, a thin layer over the facade's JIT API.
//!
//! Needs: the `einfuse` crate (the same pipeline function as the command line and the Rust API).
//! Guarantees: every error is an `EinfuseError` (a `ValueError`) whose message is what the
//! command line prints; kernels run with the interpreter lock released; contiguous float32
//! arrays are read in place and outputs are handed to NumPy without a copy. The pure-Python
//! package (`python/einfuse/`) turns torch tensors and 16-bit arrays into what this takes.

use std::sync::Arc;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{PyArrayDescrMethods, PyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

create_exception!(
    _native,
    EinfuseError,
    pyo3::exceptions::PyValueError,
    "A user error: its message is the diagnostic the command line prints."
);

fn error(e: einfuse::Error) -> PyErr {
    EinfuseError::new_err(e.report())
}

/// One compiled kernel; shared by every Python object that refers to it, callable from several
/// threads at once.
#[pyclass(frozen, module = "einfuse._native")]
struct Kernel {
    kernel: Arc<einfuse::Kernel>,
}

/// An input or output as `(name, ranks, fixed extents, dtype)`.
type PortTuple = (String, Vec<String>, Vec<Option<u64>>, &'static str);

fn port(p: einfuse::Port) -> PortTuple {
    (p.name, p.ranks, p.extents, p.dtype.name())
}

#[pymethods]
impl Kernel {
    #[getter]
    fn name(&self) -> String {
        self.kernel.name().to_string()
    }

    /// The inputs, in declaration order.
    #[getter]
    fn inputs(&self) -> Vec<PortTuple> {
        self.kernel.inputs().into_iter().map(port).collect()
    }

    /// The outputs, in declaration order.
    #[getter]
    fn outputs(&self) -> Vec<PortTuple> {
        self.kernel.outputs().into_iter().map(port).collect()
    }

    /// The cascade that runs (after optimization, when asked for), as `.ein`.
    #[getter]
    fn source(&self) -> String {
        einfuse::compiler::print::print_cascade(self.kernel.cascade())
    }

    /// Calls the kernel on NumPy arrays or CPU torch tensors (float32, float16; bfloat16 from
    /// torch) given by input name; returns the outputs by name as float32 arrays, torch tensors
    /// where any input was one. A row-major float32 input is read in place; any other is copied
    /// once into row-major float32.
    #[pyo3(signature = (inputs, offsets = None))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyDict>,
        offsets: Option<Vec<(String, i64)>>,
    ) -> PyResult<(Bound<'py, PyDict>, bool)> {
        let mut names: Vec<String> = Vec::with_capacity(inputs.len());
        let mut views: Vec<View<'py>> = Vec::with_capacity(inputs.len());
        let mut torch_in = false;
        for (name, value) in inputs.iter() {
            let name: String = name.extract()?;
            let (view, from_torch) = View::of(py, &name, value)?;
            torch_in |= from_torch;
            views.push(view);
            names.push(name);
        }
        let slices: Vec<(&str, &[f32], &[usize])> =
            names.iter().zip(&views).map(|(name, view)| (name.as_str(), view.slice(), view.shape.as_slice())).collect();
        let options = einfuse::CallOptions { offsets: offsets.unwrap_or_default() };
        let kernel = &self.kernel;
        let outputs = py.detach(|| kernel.call_with(&slices, &options)).map_err(error)?;
        let result = PyDict::new(py);
        for (name, tensor) in outputs {
            let shape = tensor.shape().to_vec();
            let array = match ArrayD::from_shape_vec(IxDyn(&shape), tensor.into_data()) {
                Ok(array) => PyArrayDyn::from_owned_array(py, array),
                Err(_) => unreachable!("an output holds its shape's elements"),
            };
            match torch_in {
                true => result.set_item(name, torch(py)?.from_numpy.bind(py).call1((array,))?)?,
                false => result.set_item(name, array)?,
            }
        }
        Ok((result, torch_in))
    }
}

/// What the package needs of torch, looked up once.
struct Torch {
    tensor: Py<PyAny>,
    to_dlpack: Py<PyAny>,
    from_numpy: Py<PyAny>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

fn torch(py: Python<'_>) -> PyResult<&'static Torch> {
    TORCH.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        Ok(Torch {
            tensor: torch.getattr("Tensor")?.unbind(),
            to_dlpack: torch.getattr("_C")?.getattr("_to_dlpack")?.unbind(),
            from_numpy: torch.getattr("from_numpy")?.unbind(),
        })
    })
}

/// The element types an input may have.
#[derive(Clone, Copy, PartialEq)]
enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn bytes(self) -> isize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::Bf16 => 2,
        }
    }

    /// The element at `at`, as f32.
    ///
    /// # Safety
    /// `at` must point to an element of this type (any alignment).
    unsafe fn read(self, at: *const u8) -> f32 {
        match self {
            Elem::F32 => unsafe { (at as *const f32).read_unaligned() },
            Elem::F16 => half::f16::from_bits(unsafe { (at as *const u16).read_unaligned() }).to_f32(),
            Elem::Bf16 => half::bf16::from_bits(unsafe { (at as *const u16).read_unaligned() }).to_f32(),
        }
    }
}

/// An input's elements: read in place where they are row-major, aligned float32, else copied
/// once into row-major float32 (strided views, 16-bit types).
struct View<'py> {
    /// Keeps the memory alive: the array, or the tensor's DLPack capsule.
    _owner: Bound<'py, PyAny>,
    shape: Vec<usize>,
    /// The first element, when read in place.
    data: *const f32,
    copy: Option<Vec<f32>>,
}

impl<'py> View<'py> {
    /// The view of a NumPy array or a CPU torch tensor, and whether it is a torch tensor.
    fn of(py: Python<'py>, name: &str, value: Bound<'py, PyAny>) -> PyResult<(View<'py>, bool)> {
        let refuse = |what: String| EinfuseError::new_err(format!("error: input `{name}` {what}"));
        if let Ok(array) = value.cast::<PyUntypedArray>() {
            let dtype = array.dtype();
            let elem = if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
                Elem::F32
            } else if dtype.is_equiv_to(&numpy::dtype::<half::f16>(py)) {
                Elem::F16
            } else {
                return Err(refuse(format!(
                    "has dtype {dtype}; einfuse takes float32 or float16 arrays (convert with .astype(np.float32))"
                )));
            };
            let shape = array.shape().to_vec();
            let strides = array.strides().to_vec();
            // SAFETY: a NumPy array's data pointer, shape and byte strides describe its memory.
            let data = unsafe { (*array.as_array_ptr()).fields.data } as *const u8;
            let view = View::strided(value, data, shape, &strides, elem);
            return Ok((view, false));
        }
        let torch_module = value.get_type().module().map(|m| m.to_string()).unwrap_or_default();
        if torch_module.starts_with("torch") && value.is_instance(torch(py)?.tensor.bind(py))? {
            let device_error = || -> PyResult<PyErr> {
                let device = value.getattr("device")?;
                Ok(refuse(format!("is on {device}, not the CPU (move it with .cpu())")))
            };
            // One DLPack capsule describes the tensor (one C call, where reading its attributes
            // one by one costs more and evicts the kernel's data from the caches); dropping the
            // capsule unconsumed releases it.
            let capsule = match torch(py)?.to_dlpack.bind(py).call1((&value,)) {
                Ok(capsule) => capsule,
                // A tensor without memory to describe (on the meta device, say).
                Err(_) if !value.getattr("is_cpu")?.extract::<bool>()? => return Err(device_error()?),
                Err(e) => return Err(refuse(format!("cannot be read: {e}"))),
            };
            // SAFETY: torch's `_to_dlpack` returns a capsule named "dltensor" holding a
            // `DLManagedTensor`, valid while the capsule lives; the view keeps the capsule.
            let managed = unsafe { pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), c"dltensor".as_ptr()) };
            if managed.is_null() {
                return Err(PyErr::fetch(py));
            }
            let tensor = unsafe { &*(managed as *const DlTensor) };
            let elem = match (tensor.dtype_code, tensor.dtype_bits, tensor.dtype_lanes) {
                (2, 32, 1) => Elem::F32,
                (2, 16, 1) => Elem::F16,
                (4, 16, 1) => Elem::Bf16,
                _ => {
                    let dtype = value.getattr("dtype")?;
                    return Err(refuse(format!("has dtype {dtype}; einfuse takes float32, float16 or bfloat16")));
                }
            };
            if tensor.device_type != 1 {
                return Err(device_error()?);
            }
            let ndim = tensor.ndim.max(0) as usize;
            // SAFETY: `shape` (and `strides`, when not null) hold `ndim` integers.
            let shape: Vec<usize> = match ndim {
                0 => vec![],
                _ => unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }.iter().map(|n| *n as usize).collect(),
            };
            let strides: Vec<isize> = match ndim == 0 || tensor.strides.is_null() {
                true => row_major_strides(&shape, elem.bytes()),
                false => unsafe { std::slice::from_raw_parts(tensor.strides, ndim) }
                    .iter()
                    .map(|s| *s as isize * elem.bytes())
                    .collect(),
            };
            let data = unsafe { (tensor.data as *const u8).add(tensor.byte_offset as usize) };
            return Ok((View::strided(capsule, data, shape, &strides, elem), true));
        }
        let found = value.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        Err(refuse(format!("must be a NumPy array or a torch tensor, not {found}")))
    }

    /// The view of `shape` elements of type `elem` at `data`, `strides` bytes apart, owned by
    /// `owner`: in place when they are row-major aligned float32, copied otherwise.
    fn strided(
        owner: Bound<'py, PyAny>,
        data: *const u8,
        shape: Vec<usize>,
        strides: &[isize],
        elem: Elem,
    ) -> View<'py> {
        let dense = row_major_strides(&shape, elem.bytes());
        let row_major = shape.iter().zip(strides).zip(&dense).all(|((n, s), d)| *n == 1 || s == d);
        if elem == Elem::F32 && row_major && (data as usize) % 4 == 0 {
            return View { _owner: owner, shape, data: data as *const f32, copy: None };
        }
        let len = shape.iter().product::<usize>();
        let mut copy = Vec::with_capacity(len);
        let mut index = vec![0usize; shape.len()];
        for _ in 0..len {
            let offset: isize = index.iter().zip(strides).map(|(i, s)| *i as isize * s).sum();
            // SAFETY: every index lies inside the shape, so the element lies inside the owner's
            // memory, as NumPy and torch lay it out.
            copy.push(unsafe { elem.read(data.offset(offset)) });
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        View { _owner: owner, shape, data: std::ptr::null(), copy: Some(copy) }
    }

    /// The elements, row-major.
    fn slice(&self) -> &[f32] {
        if let Some(copy) = &self.copy {
            return copy;
        }
        let len = self.shape.iter().product::<usize>();
        if len == 0 {
            return &[];
        }
        // SAFETY: an in-place view holds `len` aligned f32 at `data`, owned by `_owner`, which
        // lives as long as `self`. The kernel only reads them. Without rust-numpy's borrow
        // tracking (which costs microseconds for every fresh view; it guards only against other
        // native extensions anyway), nothing stops another Python thread from writing an input
        // while the call reads it: a data race, which the package's documentation forbids, as
        // for NumPy's own loops that release the interpreter lock.
        unsafe { std::slice::from_raw_parts(self.data, len) }
    }
}

/// The head of DLPack's `DLTensor` (dlpack.h, stable since 0.2): what a `DLManagedTensor` starts
/// with.
#[repr(C)]
struct DlTensor {
    data: *mut std::ffi::c_void,
    device_type: i32,
    device_id: i32,
    ndim: i32,
    dtype_code: u8,
    dtype_bits: u8,
    dtype_lanes: u16,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// The strides of a row-major array of `shape`, in bytes for elements of `bytes` bytes.
fn row_major_strides(shape: &[usize], bytes: isize) -> Vec<isize> {
    let mut strides = vec![bytes; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as isize;
    }
    strides
}

/// Compiles every kernel of `source` (errors name `path`); returns them in source order.
#[pyfunction]
#[pyo3(signature = (source, path, target, optimize, tile, params, check_finite, threads, split_keys))]
#[allow(clippy::too_many_arguments)]
fn compile(
    py: Python<'_>,
    source: &str,
    path: &str,
    target: &str,
    optimize: bool,
    tile: Option<u64>,
    params: Vec<(String, f64)>,
    check_finite: bool,
    threads: Option<usize>,
    split_keys: Option<u64>,
) -> PyResult<Vec<Kernel>> {
    let target: einfuse::Target = target.parse().map_err(error)?;
    let options = einfuse::CompileOptions {
        target,
        optimize,
        tile,
        params,
        check_finite,
        threads: threads.unwrap_or_else(einfuse::all_cores),
        split_keys,
    };
    let compiled = py.detach(|| einfuse::compile_named(path, source, &options)).map_err(error)?;
    Ok(compiled.kernels.into_iter().map(|kernel| Kernel { kernel: Arc::new(kernel) }).collect())
}

/// `einfuse analyze --json` as a JSON string.
#[pyfunction]
#[pyo3(signature = (source, path, kernel = None))]
fn analyze(py: Python<'_>, source: &str, path: &str, kernel: Option<&str>) -> PyResult<String> {
    py.detach(|| {
        let program = einfuse::Program::from_source(path, source)?;
        einfuse::text::analyze_json(&program, kernel)
    })
    .map(|json| json.to_string())
    .map_err(error)
}

/// The text of `einfuse emit --stage STAGE`.
#[pyfunction]
#[pyo3(signature = (source, path, stage, kernel = None, target = "nvptx", chunk = 1024))]
fn emit(
    py: Python<'_>,
    source: &str,
    path: &str,
    stage: &str,
    kernel: Option<&str>,
    target: &str,
    chunk: u64,
) -> PyResult<String> {
    use clap::ValueEnum;
    let usage = |what: &str, value: &str, all: Vec<String>| {
        EinfuseError::new_err(format!("error: no {what} `{value}` (there are: {})", all.join(", ")))
    };
    let names = |all: &[einfuse::text::EmitStage]| -> Vec<String> {
        all.iter().filter_map(|s| s.to_possible_value()).map(|v| v.get_name().to_string()).collect()
    };
    let stage = einfuse::text::EmitStage::from_str(stage, true)
        .map_err(|_| usage("stage", stage, names(einfuse::text::EmitStage::value_variants())))?;
    let llvm_targets = einfuse::text::LlvmTarget::value_variants();
    let target = einfuse::text::LlvmTarget::from_str(target, true).map_err(|_| {
        let all = llvm_targets.iter().filter_map(|s| s.to_possible_value()).map(|v| v.get_name().to_string());
        usage("LLVM target", target, all.collect())
    })?;
    let options = einfuse::text::EmitOptions { kernel, target, chunk };
    py.detach(|| einfuse::text::emit(path, source, stage, &options)).map_err(error)
}

/// `einfuse explain`'s text.
#[pyfunction]
#[pyo3(signature = (source, path, kernel = None))]
fn explain(py: Python<'_>, source: &str, path: &str, kernel: Option<&str>) -> PyResult<String> {
    py.detach(|| einfuse::text::explain(&einfuse::Program::from_source(path, source)?, kernel)).map_err(error)
}

/// Reads a source file as the command line does (size and UTF-8 checked).
#[pyfunction]
fn read_source(path: &str) -> PyResult<String> {
    einfuse::read_source(path.as_ref()).map_err(error)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("EinfuseError", m.py().get_type::<EinfuseError>())?;
    m.add_class::<Kernel>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(emit, m)?)?;
    m.add_function(wrap_pyfunction!(explain, m)?)?;
    m.add_function(wrap_pyfunction!(read_source, m)?)?;
    Ok(())
}
