//! Launching NVPTX kernels through the CUDA driver, loaded at run time (cudarc with dynamic
//! loading): einfuse builds everywhere, and where no driver is found, a GPU run is a clear error.
//!
//! This part needs no LLVM: the PTX may come from `einfuse compile --target nvptx` on another
//! machine, so that a binary built without the `llvm` feature can run it on a GPU machine.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::compiler::llvm::launch::{HostValues, ThreadLayout};
use crate::compiler::schedule::LoopProgram;

/// The most device memory one call may allocate.
pub const MAX_DEVICE_BYTES: u64 = 64 << 30;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// No driver: the caller should skip, not fail.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("{0}")]
    Run(String),
}

fn driver(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("{e:?}"))
}

/// The first GPU, with a stream to run on.
pub struct GpuDevice {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The device's name, as the driver gives it.
    pub name: String,
    /// The compute capability, as (major, minor).
    pub capability: (i32, i32),
}

impl GpuDevice {
    /// Opens GPU 0; `GpuError::NoDriver` where `libcuda` cannot be loaded or has no device.
    pub fn open() -> Result<GpuDevice, GpuError> {
        // SAFETY: only tries to load the library; loading it runs its initialisers, as any use would.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver("the CUDA driver library (libcuda.so) was not found".into()));
        }
        let context = CudaContext::new(0).map_err(|e| GpuError::NoDriver(format!("no usable GPU ({e:?})")))?;
        let name = context.name().map_err(driver)?;
        let capability = context.compute_capability().map_err(driver)?;
        let stream = context.default_stream();
        Ok(GpuDevice { context, stream, name, capability })
    }
}

/// A kernel loaded on the GPU.
pub struct GpuKernel {
    program: LoopProgram,
    _module: Arc<CudaModule>,
    function: CudaFunction,
    stream: Arc<CudaStream>,
}

/// One buffer on the device, in the type the kernel stores it in.
enum DeviceValues {
    F32(CudaSlice<f32>),
    Narrow(CudaSlice<u16>),
}

/// The buffers and tables of one call, on the device.
struct DeviceCall {
    layout: ThreadLayout,
    values: Vec<DeviceValues>,
    _masks: Vec<Option<CudaSlice<u8>>>,
    tables: [CudaSlice<i64>; 6],
}

impl GpuKernel {
    /// Loads `ptx` (made by `compiler::llvm::compile_ptx` for `program`) on `device`.
    pub fn load(device: &GpuDevice, program: &LoopProgram, ptx: &str) -> Result<GpuKernel, GpuError> {
        let module = device.context.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(driver)?;
        let function = module.load_function(&program.cascade.name).map_err(driver)?;
        Ok(GpuKernel { program: program.clone(), _module: module, function, stream: device.stream.clone() })
    }

    /// Registers per thread and local (spilled) bytes per thread, as the driver compiled them.
    pub fn resources(&self) -> Result<(i32, i32), GpuError> {
        Ok((self.function.num_regs().map_err(driver)?, self.function.local_size_bytes().map_err(driver)?))
    }
}

impl Launched for GpuKernel {
    type Call = DeviceCall;

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn upload(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<DeviceCall, GpuError> {
        let layout = ThreadLayout::new(&self.program, extents, MAX_DEVICE_BYTES).map_err(GpuError::Run)?;
        let (values, masks) = layout.host_buffers(&self.program, inputs).map_err(GpuError::Run)?;
        let s = &self.stream;
        let values: Vec<DeviceValues> = values
            .iter()
            .map(|v| match v {
                HostValues::F32(v) => s.clone_htod(v).map(DeviceValues::F32),
                HostValues::Narrow(v) => s.clone_htod(v).map(DeviceValues::Narrow),
            })
            .collect::<Result<_, _>>()
            .map_err(driver)?;
        let masks: Vec<Option<CudaSlice<u8>>> = masks
            .iter()
            .map(|m| if m.is_empty() { Ok(None) } else { s.clone_htod(m).map(Some) })
            .collect::<Result<_, _>>()
            .map_err(driver)?;
        let value_pointers: Vec<i64> = values
            .iter()
            .map(|v| match v {
                DeviceValues::F32(v) => v.device_ptr(s).0 as i64,
                DeviceValues::Narrow(v) => v.device_ptr(s).0 as i64,
            })
            .collect();
        let mask_pointers: Vec<i64> =
            masks.iter().map(|m| m.as_ref().map_or(0, |m| m.device_ptr(s).0 as i64)).collect();
        let table = |data: &[i64]| -> Result<CudaSlice<i64>, GpuError> {
            // A table is never empty on the device: a kernel with no ranks still gets a pointer.
            let data = if data.is_empty() { &[0i64][..] } else { data };
            s.clone_htod(data).map_err(driver)
        };
        let tables = [
            table(&value_pointers)?,
            table(&mask_pointers)?,
            table(&layout.local_extents)?,
            table(&layout.dims)?,
            table(&layout.strides)?,
            table(&layout.batch)?,
        ];
        Ok(DeviceCall { layout, values, _masks: masks, tables })
    }

    fn launch(&self, call: &DeviceCall) -> Result<(), GpuError> {
        if call.layout.threads == 0 {
            return Ok(());
        }
        let grid =
            u32::try_from(call.layout.grid).map_err(|_| GpuError::Run("too many threads for one grid".into()))?;
        let config = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (call.layout.block as u32, 1, 1),
            shared_mem_bytes: call.layout.shared_bytes as u32,
        };
        let threads = call.layout.scratch_copies() as i64;
        let mut builder = self.stream.launch_builder(&self.function);
        for table in &call.tables {
            builder.arg(table);
        }
        builder.arg(&threads);
        // SAFETY: the arguments match the kernel's parameters (six tables and the thread count),
        // and every buffer holds what `ThreadLayout` says the threads address.
        unsafe { builder.launch(config) }.map_err(driver)?;
        Ok(())
    }

    fn download(&self, call: &DeviceCall) -> Result<Vec<Vec<f32>>, GpuError> {
        self.stream.synchronize().map_err(driver)?;
        let mut values = Vec::new();
        for (buffer, slice) in self.program.buffers.iter().zip(&call.values) {
            let output = matches!(buffer.role, crate::compiler::schedule::BufferRole::Output(_));
            values.push(match slice {
                DeviceValues::F32(v) if output => HostValues::F32(self.stream.clone_dtoh(v).map_err(driver)?),
                DeviceValues::Narrow(v) if output => HostValues::Narrow(self.stream.clone_dtoh(v).map_err(driver)?),
                _ => HostValues::F32(Vec::new()),
            });
        }
        Ok(call.layout.outputs(&self.program, values))
    }
}

/// A tensor-core kernel (`compiler::llvm::tensor_cores`) loaded on the GPU.
pub struct TensorCoreGpuKernel {
    program: LoopProgram,
    plan: crate::compiler::schedule::tensor_cores::TensorCorePlan,
    _module: Arc<CudaModule>,
    function: CudaFunction,
    stream: Arc<CudaStream>,
}

/// The buffers and tables of one tensor-core call, on the device.
struct TensorCoreDeviceCall {
    call: crate::compiler::llvm::tensor_cores::TensorCoreCall,
    values: Vec<Option<DeviceValues>>,
    tables: [CudaSlice<i64>; 3],
}

impl TensorCoreGpuKernel {
    /// Loads `ptx` (from `compiler::llvm::tensor_core_ptx` for `program`) on `device`.
    pub fn load(device: &GpuDevice, program: &LoopProgram, ptx: &str) -> Result<TensorCoreGpuKernel, GpuError> {
        let plan = crate::compiler::schedule::tensor_cores::plan(program).map_err(GpuError::Run)?;
        let module = device.context.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(driver)?;
        let function = module.load_function(&program.cascade.name).map_err(driver)?;
        Ok(TensorCoreGpuKernel {
            program: program.clone(),
            plan,
            _module: module,
            function,
            stream: device.stream.clone(),
        })
    }

    /// Registers per thread and local (spilled) bytes per thread, as the driver compiled them.
    pub fn resources(&self) -> Result<(i32, i32), GpuError> {
        Ok((self.function.num_regs().map_err(driver)?, self.function.local_size_bytes().map_err(driver)?))
    }
}

impl Launched for TensorCoreGpuKernel {
    type Call = TensorCoreDeviceCall;

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn upload(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<TensorCoreDeviceCall, GpuError> {
        use crate::compiler::llvm::tensor_cores::TensorCoreCall;
        let call = TensorCoreCall::new(&self.program, &self.plan, extents);
        let host = call.host_buffers(&self.program, inputs).map_err(GpuError::Run)?;
        let s = &self.stream;
        let values: Vec<Option<DeviceValues>> = host
            .iter()
            .map(|v| match v {
                Some(HostValues::F32(v)) => s.clone_htod(v).map(|d| Some(DeviceValues::F32(d))),
                Some(HostValues::Narrow(v)) => s.clone_htod(v).map(|d| Some(DeviceValues::Narrow(d))),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()
            .map_err(driver)?;
        let pointers: Vec<i64> = values
            .iter()
            .map(|v| match v {
                Some(DeviceValues::F32(v)) => v.device_ptr(s).0 as i64,
                Some(DeviceValues::Narrow(v)) => v.device_ptr(s).0 as i64,
                None => 0,
            })
            .collect();
        let table = |data: &[i64]| -> Result<CudaSlice<i64>, GpuError> {
            let data = if data.is_empty() { &[0i64][..] } else { data };
            s.clone_htod(data).map_err(driver)
        };
        let tables = [table(&pointers)?, table(&call.extents)?, table(&call.strides)?];
        Ok(TensorCoreDeviceCall { call, values, tables })
    }

    fn launch(&self, call: &TensorCoreDeviceCall) -> Result<(), GpuError> {
        if call.call.grid == 0 {
            return Ok(());
        }
        let grid = u32::try_from(call.call.grid).map_err(|_| GpuError::Run("too many blocks for one grid".into()))?;
        let config = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (crate::compiler::schedule::tensor_cores::THREADS as u32, 1, 1),
            shared_mem_bytes: call.call.shared_bytes as u32,
        };
        let mut builder = self.stream.launch_builder(&self.function);
        for table in &call.tables {
            builder.arg(table);
        }
        // SAFETY: the arguments match the kernel's parameters (three tables), and every buffer
        // holds what `TensorCoreCall` says the kernel addresses.
        unsafe { builder.launch(config) }.map_err(driver)?;
        Ok(())
    }

    fn download(&self, call: &TensorCoreDeviceCall) -> Result<Vec<Vec<f32>>, GpuError> {
        self.stream.synchronize().map_err(driver)?;
        let mut host = Vec::new();
        for (t, slice) in call.values.iter().enumerate() {
            let output = self.program.cascade.outputs.iter().any(|o| o.tensor.index() == t);
            host.push(match slice {
                Some(DeviceValues::F32(v)) if output => {
                    Some(HostValues::F32(self.stream.clone_dtoh(v).map_err(driver)?))
                }
                Some(DeviceValues::Narrow(v)) if output => {
                    Some(HostValues::Narrow(self.stream.clone_dtoh(v).map_err(driver)?))
                }
                _ => None,
            });
        }
        Ok(call.call.outputs(&self.program, &host))
    }
}

/// What both kinds of GPU kernel do: upload a call's buffers and tables once, launch, download
/// the outputs.
trait Launched {
    type Call;
    fn stream(&self) -> &Arc<CudaStream>;
    fn upload(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Self::Call, GpuError>;
    fn launch(&self, call: &Self::Call) -> Result<(), GpuError>;
    fn download(&self, call: &Self::Call) -> Result<Vec<Vec<f32>>, GpuError>;
}

/// Runs a kernel once; inputs and outputs as for `CpuKernel::run`.
fn run_once<K: Launched>(kernel: &K, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
    let call = kernel.upload(extents, inputs)?;
    kernel.launch(&call)?;
    kernel.download(&call)
}

/// Runs a kernel `runs` times on the same device buffers after one warm-up; the outputs and the
/// time of each launch, between two CUDA events around it (transfers excluded).
fn time_runs<K: Launched>(
    kernel: &K,
    extents: &[u64],
    inputs: &[&[f32]],
    runs: usize,
) -> Result<(Vec<Vec<f32>>, Vec<f64>), GpuError> {
    let call = kernel.upload(extents, inputs)?;
    kernel.launch(&call)?;
    let stream = kernel.stream();
    stream.synchronize().map_err(driver)?;
    let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let start = stream.context().new_event(timed).map_err(driver)?;
        let end = stream.context().new_event(timed).map_err(driver)?;
        start.record(stream).map_err(driver)?;
        kernel.launch(&call)?;
        end.record(stream).map_err(driver)?;
        times.push(start.elapsed_ms(&end).map_err(driver)? as f64 / 1e3);
    }
    Ok((kernel.download(&call)?, times))
}

impl GpuKernel {
    /// Runs the kernel once; inputs and outputs as for `CpuKernel::run`.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
        run_once(self, extents, inputs)
    }

    /// See `time_runs`.
    pub fn time(&self, extents: &[u64], inputs: &[&[f32]], runs: usize) -> Result<(Vec<Vec<f32>>, Vec<f64>), GpuError> {
        time_runs(self, extents, inputs, runs)
    }
}

impl TensorCoreGpuKernel {
    /// Runs the kernel once; inputs and outputs as for `CpuKernel::run`.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
        run_once(self, extents, inputs)
    }

    /// See `time_runs`.
    pub fn time(&self, extents: &[u64], inputs: &[&[f32]], runs: usize) -> Result<(Vec<Vec<f32>>, Vec<f64>), GpuError> {
        time_runs(self, extents, inputs, runs)
    }
}
