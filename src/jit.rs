//! The JIT API: compile `.ein` source once, then call its kernels with tensors or slices.
//!
//! ```
//! use einfuse::{compile, CompileOptions, DType, Tensor};
//!
//! let source = "
//!     kernel attention {
//!       rank E = 4, F = 4, M, P
//!       input Q[E, P], K[E, M], V[F, M]
//!       QK[m, p] = Q[e, p] * K[e, m]
//!       GM[p]    = max[m](QK[m, p])
//!       SN[m, p] = exp(QK[m, p] - GM[p])
//!       SD[p]    = SN[m, p]
//!       AV[f, p] = SN[m, p] / SD[p] * V[f, m]
//!       output AV
//!     }";
//! let compiled = compile(source, &CompileOptions::default()).unwrap();
//! let kernel = compiled.kernel("attention").unwrap();
//! let q = Tensor::random(DType::F32, vec![4, 3], 1).unwrap();   // E = 4, P = 3
//! let k = Tensor::random(DType::F32, vec![4, 10], 2).unwrap();  // M = 10 keys
//! let v = Tensor::random(DType::F32, vec![4, 10], 3).unwrap();
//! let outputs = kernel.call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap();
//! assert_eq!(outputs[0].0, "AV");
//! assert_eq!(outputs[0].1.shape(), &[4, 3]);
//! // A tensor of the wrong shape is an error that names it, not a crash.
//! let wrong = Tensor::random(DType::F32, vec![5, 3], 1).unwrap();
//! let error = kernel.call(&[("Q", &wrong), ("K", &k), ("V", &v)]).unwrap_err();
//! assert!(error.to_string().contains("`Q`"));
//! ```

use std::path::Path;

use crate::compiler::cpu::CpuKernel;
use crate::compiler::ir::{Cascade, TensorKind};
use crate::compiler::shapes::{bind_extents, ShapeError};
use crate::compiler::split::SplitKeys;
use crate::{dtype_of, Error, Program, RunOptions, Target, Tensor};

/// How to compile.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Where the kernels run. The default, `Target::Cpu` (Cranelift), compiles in milliseconds;
    /// `Target::CpuLlvm` takes longer to compile (LLVM's O3 pipeline) and uses the CPU's full
    /// vector width, for long-running kernels.
    pub target: Target,
    /// Run the e-graph optimizer first (fewest passes).
    pub optimize: bool,
    /// The tile size of split ranks the optimizer creates; by default 64, on the GPU targets as
    /// `optimize_for_gpu` chooses (32 where a head dimension of 128 needs it).
    pub tile: Option<u64>,
    /// Param overrides, baked into the compiled code.
    pub params: Vec<(String, f64)>,
    /// Fail when an output holds an infinity or a NaN.
    pub check_finite: bool,
    /// Threads each call uses (default: every core).
    pub threads: usize,
    /// Compile the split-key (Flash-Decoding) form with chunks of this many keys: a call runs
    /// every chunk at once, then the merge (see `compiler::split`). A kernel that does not split
    /// is an error at compile time.
    pub split_keys: Option<u64>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target: Target::Cpu,
            optimize: true,
            tile: None,
            params: vec![],
            check_finite: true,
            threads: crate::all_cores(),
            split_keys: None,
        }
    }
}

/// The compiled kernels of one source.
pub struct Compiled {
    pub kernels: Vec<Kernel>,
}

/// One compiled kernel; `Send + Sync`, so it may be called from several threads at once.
pub struct Kernel {
    cascade: Cascade,
    target: Target,
    cpu: Option<CpuKernel>,
    check_finite: bool,
    threads: usize,
    /// The split-key form, and its two kernels compiled for the CPU targets.
    split: Option<(SplitKeys, Option<(CpuKernel, CpuKernel)>)>,
}

/// Compiles a cascade for a CPU target; `None` for the others, which run through `crate::run`.
fn compile_for(cascade: &Cascade, target: Target) -> Result<Option<CpuKernel>, Error> {
    Ok(match target {
        Target::Cpu => Some(crate::compile_cpu(cascade)?),
        #[cfg(feature = "llvm")]
        Target::CpuLlvm => Some(crate::compile_cpu_llvm(cascade)?),
        _ => None,
    })
}

/// Compiles every kernel of `source`.
pub fn compile(source: &str, options: &CompileOptions) -> Result<Compiled, Error> {
    compile_program(Program::from_source("<source>", source)?, options)
}

/// Compiles every kernel of a file.
pub fn compile_file(path: &Path, options: &CompileOptions) -> Result<Compiled, Error> {
    compile_program(Program::from_file(path)?, options)
}

fn compile_program(program: Program, options: &CompileOptions) -> Result<Compiled, Error> {
    let mut kernels = Vec::new();
    for mut cascade in program.kernels {
        for (name, value) in &options.params {
            match cascade.params.iter_mut().find(|p| &p.name == name) {
                Some(param) => param.value = *value,
                None => return Err(Error::Usage(format!("kernel `{}` has no param `{name}`", cascade.name))),
            }
        }
        if options.optimize {
            cascade = crate::optimize_for_target(&cascade, options.target, options.tile)?.cascade;
        }
        let split = match options.split_keys {
            None => None,
            Some(keys) => {
                let split = crate::compiler::split::split_keys(&cascade, keys).map_err(|why| {
                    Error::Usage(format!("kernel `{}` does not split into chunks: {why}", cascade.name))
                })?;
                let parts =
                    match (compile_for(&split.chunks, options.target)?, compile_for(&split.merge, options.target)?) {
                        (Some(chunks), Some(merge)) => Some((chunks, merge)),
                        _ => None,
                    };
                Some((split, parts))
            }
        };
        let cpu = if split.is_some() { None } else { compile_for(&cascade, options.target)? };
        kernels.push(Kernel {
            cascade,
            target: options.target,
            cpu,
            check_finite: options.check_finite,
            threads: options.threads.max(1),
            split,
        });
    }
    Ok(Compiled { kernels })
}

impl Compiled {
    /// The kernel named `name`.
    pub fn kernel(&self, name: &str) -> Result<&Kernel, Error> {
        self.kernels.iter().find(|k| k.cascade.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.kernels.iter().map(|k| k.cascade.name.as_str()).collect();
            Error::Usage(format!("no kernel `{name}` (there are: {})", names.join(", ")))
        })
    }
}

impl Kernel {
    pub fn name(&self) -> &str {
        &self.cascade.name
    }

    /// The cascade that runs (after optimization, when asked for).
    pub fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    /// Calls the kernel with tensors by input name; symbolic ranks are bound from their shapes.
    /// Returns the outputs by name, in declaration order.
    pub fn call(&self, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>, Error> {
        let views: Vec<(&str, &[f32], &[usize])> = inputs.iter().map(|(n, t)| (*n, t.data(), t.shape())).collect();
        self.call_slices(&views)
    }

    /// Calls the kernel with borrowed row-major f32 slices and their shapes.
    pub fn call_slices(&self, inputs: &[(&str, &[f32], &[usize])]) -> Result<Vec<(String, Tensor)>, Error> {
        let c = &self.cascade;
        let ids = c.inputs();
        for (name, _, _) in inputs {
            if !ids.iter().any(|id| c.tensor(*id).name == *name) {
                return Err(ShapeError::UnknownInput { tensor: name.to_string() }.into());
            }
            if inputs.iter().filter(|(n, _, _)| n == name).count() > 1 {
                return Err(Error::Usage(format!("input `{name}` is given twice")));
            }
        }
        let mut ordered: Vec<(&[f32], &[usize])> = Vec::new();
        for id in &ids {
            let name = &c.tensor(*id).name;
            let (_, data, shape) = inputs
                .iter()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| ShapeError::MissingInput { tensor: name.clone() })?;
            let expected: usize = shape.iter().product();
            if data.len() != expected {
                return Err(Error::Usage(format!(
                    "input `{name}`: the slice holds {} elements but its shape {shape:?} needs {expected}",
                    data.len()
                )));
            }
            ordered.push((data, shape));
        }
        let shapes: Vec<_> =
            ids.iter().zip(&ordered).map(|(id, (_, shape))| (*id, shape.iter().map(|n| *n as u64).collect())).collect();
        let extents = bind_extents(c, &[], &shapes)?;
        let compiled = self.cpu.is_some() || matches!(self.split, Some((_, Some(_))));
        match (compiled, self.target) {
            (true, _) => {
                // Narrow storage types hold only representable values.
                let rounded: Vec<Vec<f32>> = ids
                    .iter()
                    .zip(&ordered)
                    .map(|(id, (data, _))| match c.tensor(*id).kind {
                        TensorKind::Input { elem } => {
                            let dtype = dtype_of(elem);
                            data.iter().map(|x| dtype.round(*x)).collect()
                        }
                        TensorKind::Defined { .. } => unreachable!("inputs"),
                    })
                    .collect();
                let slices: Vec<&[f32]> = rounded.iter().map(Vec::as_slice).collect();
                let values = match (&self.cpu, &self.split) {
                    (Some(cpu), _) => cpu.run_threads(&extents, &slices, self.threads)?,
                    (None, Some((split, Some((chunks, merge))))) => {
                        crate::run_split_with(c, split, &extents, &slices, &mut |part, extents, inputs| {
                            let kernel = if part == crate::SplitPart::Chunks { chunks } else { merge };
                            Ok(kernel.run_threads(extents, inputs, self.threads)?)
                        })?
                    }
                    _ => unreachable!("compiled"),
                };
                let outputs = crate::output_tensors(c, &extents, values);
                if self.check_finite {
                    crate::check_finite(&outputs)?;
                }
                Ok(outputs)
            }
            (false, target) => {
                let tensors = ids
                    .iter()
                    .zip(&ordered)
                    .map(|(id, (data, shape))| {
                        let TensorKind::Input { elem } = c.tensor(*id).kind else { unreachable!("inputs") };
                        let tensor = Tensor::new(dtype_of(elem), shape.to_vec(), data.to_vec()).expect("checked size");
                        (c.tensor(*id).name.clone(), tensor)
                    })
                    .collect();
                let options = RunOptions {
                    inputs: tensors,
                    check_finite: self.check_finite,
                    split_keys: self.split.as_ref().map(|(split, _)| split.chunk),
                    ..RunOptions::default()
                };
                crate::run(c, target, &options)
            }
        }
    }
}
