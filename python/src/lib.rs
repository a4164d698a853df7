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

    /// Calls the kernel on float32 NumPy arrays given by input name; returns the outputs by
    /// name, float32 NumPy arrays. A contiguous array is read in place; any other is copied once.
    #[pyo3(signature = (inputs, offsets = None))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyDict>,
        offsets: Option<Vec<(String, i64)>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut names: Vec<String> = Vec::with_capacity(inputs.len());
        let mut arrays: Vec<Bound<'py, PyArrayDyn<f32>>> = Vec::with_capacity(inputs.len());
        for (name, value) in inputs.iter() {
            let name: String = name.extract()?;
            let array = value.cast_into::<PyArrayDyn<f32>>().map_err(|e| {
                let found = e.into_inner().get_type().name().map(|n| n.to_string()).unwrap_or_default();
                EinfuseError::new_err(format!("error: input `{name}` must be a float32 array, not {found}"))
            })?;
            arrays.push(array);
            names.push(name);
        }
        let shapes: Vec<Vec<usize>> = arrays.iter().map(|a| a.shape().to_vec()).collect();
        // SAFETY (both blocks): the kernel only reads its inputs, and `arrays` keeps them alive for
        // the call. Without rust-numpy's borrow tracking (which costs microseconds for every
        // fresh view, as `Tensor.numpy()` makes on every call; it guards only against other
        // native extensions anyway), nothing stops another Python thread from writing an input
        // while the call reads it: a data race, which the package's documentation forbids, as
        // for NumPy's own loops that release the interpreter lock.
        //
        // Strided, Fortran-ordered or misaligned arrays are copied into row-major order once.
        let copies: Vec<Option<Vec<f32>>> = arrays
            .iter()
            .map(|a| match a.is_c_contiguous() && unsafe { a.as_slice() }.is_ok() {
                true => None,
                false => Some(unsafe { a.as_array() }.iter().copied().collect()),
            })
            .collect();
        let slices: Vec<(&str, &[f32], &[usize])> = names
            .iter()
            .zip(&arrays)
            .zip(&copies)
            .zip(&shapes)
            .map(|(((name, array), copy), shape)| {
                let data = match copy {
                    Some(copy) => copy.as_slice(),
                    None => unsafe { array.as_slice() }.expect("contiguous"),
                };
                (name.as_str(), data, shape.as_slice())
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
            result.set_item(name, array)?;
        }
        Ok(result)
    }
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
