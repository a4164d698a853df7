//! `einfuse._native`: the Python extension, a thin layer over the facade's JIT API.
//!
//! Needs: the `einfuse` crate (the same pipeline function as the command line and the Rust API).
//! Guarantees: every error is an `EinfuseError` (a `ValueError`) whose message is what the
//! command line prints; kernels run with the interpreter lock released; contiguous float32
//! arrays are read in place and outputs are handed to NumPy without a copy. The pure-Python
//! package (`python/einfuse/`) turns torch tensors and 16-bit arrays into what this takes.

use std::sync::Arc;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::sync::PyOnceLock;
use pyo3::create_exception;
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(_native, EinfuseError, pyo3::exceptions::PyValueError, "A user error: its message is the diagnostic the command line prints.");

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

    /// Calls the kernel on float32 NumPy arrays or CPU torch tensors given by input name;
    /// returns the outputs by name, float32 NumPy arrays, or torch tensors with `torch_out`. A
    /// row-major input is read in place; any other is copied once.
    #[pyo3(signature = (inputs, offsets = None, torch_out = false))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyDict>,
        offsets: Option<Vec<(String, i64)>>,
        torch_out: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut names: Vec<String> = Vec::with_capacity(inputs.len());
        let mut views: Vec<View<'py>> = Vec::with_capacity(inputs.len());
        for (name, value) in inputs.iter() {
            let name: String = name.extract()?;
            views.push(View::of(py, &name, value)?);
            names.push(name);
        }
        // Inputs that are not row-major (strided, Fortran order, misaligned) are copied once.
        let copies: Vec<Option<Vec<f32>>> = views.iter().map(View::copy).collect();
        let slices: Vec<(&str, &[f32], &[usize])> = names
            .iter()
            .zip(&views)
            .zip(&copies)
            .map(|((name, view), copy)| {
                let data = match copy {
                    Some(copy) => copy.as_slice(),
                    None => view.slice(),
                };
                (name.as_str(), data, view.shape.as_slice())
            })
            .collect();
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
            match torch_out {
                true => result.set_item(name, torch(py)?.from_numpy.bind(py).call1((array,))?)?,
                false => result.set_item(name, array)?,
            }
        }
        Ok(result)
    }
}

/// What the package needs of torch, looked up once.
struct Torch {
    tensor: Py<PyAny>,
    float32: Py<PyAny>,
    from_numpy: Py<PyAny>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

fn torch(py: Python<'_>) -> PyResult<&'static Torch> {
    TORCH.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        Ok(Torch {
            tensor: torch.getattr("Tensor")?.unbind(),
            float32: torch.getattr("float32")?.unbind(),
            from_numpy: torch.getattr("from_numpy")?.unbind(),
        })
    })
}

/// An input's float32 elements where they lie: a NumPy array or a CPU torch tensor, kept alive
/// for the call, its shape, and its strides in elements.
struct View<'py> {
    _owner: Bound<'py, PyAny>,
    data: *const f32,
    shape: Vec<usize>,
    strides: Vec<isize>,
    /// Whether the elements are row-major, dense and aligned: readable in place.
    row_major: bool,
}

impl<'py> View<'py> {
    fn of(py: Python<'py>, name: &str, value: Bound<'py, PyAny>) -> PyResult<View<'py>> {
        let refuse = |what: String| EinfuseError::new_err(format!("error: input `{name}` {what}"));
        if let Ok(array) = value.cast::<PyArrayDyn<f32>>() {
            let shape = array.shape().to_vec();
            let bytes = array.strides().to_vec();
            let aligned = (array.data() as usize) % 4 == 0 && bytes.iter().all(|b| b % 4 == 0);
            let strides = bytes.iter().map(|b| b / 4).collect();
            let row_major = aligned && array.is_c_contiguous();
            let data = array.data() as *const f32;
            if !aligned {
                // Only a misaligned array lands here; copy it with NumPy into an aligned one.
                let copy = array.call_method0("copy")?;
                return View::of(py, name, copy);
            }
            return Ok(View { _owner: value, data, shape, strides, row_major });
        }
        let torch_module = value.get_type().module().map(|m| m.to_string()).unwrap_or_default();
        if torch_module.starts_with("torch") && value.is_instance(torch(py)?.tensor.bind(py))? {
            if !value.getattr("dtype")?.is(torch(py)?.float32.bind(py)) {
                return Err(refuse(format!("has dtype {}; the kernels read float32", value.getattr("dtype")?)));
            }
            if !value.getattr("is_cpu")?.extract::<bool>()? {
                let device = value.getattr("device")?;
                return Err(refuse(format!("is on {device}, not the CPU (move it with .cpu())")));
            }
            let shape: Vec<usize> = value.getattr("shape")?.extract()?;
            let strides: Vec<isize> = value.call_method0("stride")?.extract()?;
            let data = value.call_method0("data_ptr")?.extract::<usize>()? as *const f32;
            let row_major = row_major(&shape, &strides);
            return Ok(View { _owner: value, data, shape, strides, row_major });
        }
        let found = value.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        Err(refuse(format!("must be a float32 NumPy array or torch tensor, not {found}")))
    }

    /// The elements in place (row-major views only).
    fn slice(&self) -> &[f32] {
        let len = self.shape.iter().product::<usize>();
        if len == 0 {
            return &[];
        }
        // SAFETY: a row-major view holds `len` aligned f32 at `data`, owned by `_owner`, which
        // lives as long as `self`. The kernel only reads them. Without rust-numpy's borrow
        // tracking (which costs microseconds for every fresh view; it guards only against other
        // native extensions anyway), nothing stops another Python thread from writing an input
        // while the call reads it: a data race, which the package's documentation forbids, as
        // for NumPy's own loops that release the interpreter lock.
        unsafe { std::slice::from_raw_parts(self.data, len) }
    }

    /// A row-major copy of a view that is not row-major.
    fn copy(&self) -> Option<Vec<f32>> {
        if self.row_major {
            return None;
        }
        let len = self.shape.iter().product::<usize>();
        let mut out = Vec::with_capacity(len);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..len {
            let offset: isize = index.iter().zip(&self.strides).map(|(i, s)| *i as isize * s).sum();
            // SAFETY: every index is inside the shape, so the element is inside the owner's
            // memory, as NumPy and torch lay it out.
            out.push(unsafe { *self.data.offset(offset) });
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Some(out)
    }
}

/// Whether `strides` (in elements) lay out `shape` row-major and dense (a position of one point
/// may have any stride).
fn row_major(shape: &[usize], strides: &[isize]) -> bool {
    let mut expected = 1isize;
    for (n, s) in shape.iter().zip(strides).rev() {
        if *n != 1 && *s != expected {
            return false;
        }
        expected *= *n as isize;
    }
    true
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
