//! A compiled kiln package on one GPU: its manifest, the module loaded from
//! `kernels.fatbin` with `cuModuleLoadData` (the driver picks the cubin built for the
//! device, else JIT-compiles the embedded PTX), and a handle for every kernel the manifest
//! lists, looked up by name when the package loads. Also launches and timings of single
//! kernels on caller-owned buffers, for tests and benchmarks.

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::sys::CUresult;
use kiln_kir::manifest::{KernelInfo, Manifest, ParamLayout};
use kiln_kir::Plan;

use crate::device::{CudaDevice, DeviceBuffer, DeviceTensor};
use crate::error::{CudaError, DriverFailure};
use crate::ffi::{self, ArgValue, KernelFunction, LaunchOrder};
use crate::launch::LaunchShape;
use crate::timing::{time_on_device, Timing};
use crate::validate::parameter_names;

/// A kernel argument for [`CudaPackage::launch`].
#[derive(Clone, Copy, Debug)]
pub enum KernelArg<'a> {
    /// A buffer parameter, any dtype.
    Buffer(&'a DeviceBuffer),
    /// A buffer parameter whose dtype is checked against the kernel's.
    Tensor(&'a DeviceTensor),
    I64(i64),
    I32(i32),
    F32(f32),
    Pred(bool),
}

/// A package loaded on a device.
#[derive(Debug)]
pub struct CudaPackage {
    device: CudaDevice,
    manifest: Manifest,
    /// Where it came from, for messages: the directory, or a name given by the caller.
    name: String,
    /// One per `manifest.kernels`, in that order.
    kernels: Vec<KernelFunction>,
    /// How plan launches follow each other ([`dependent_launch_safe`]).
    plan_launch_order: LaunchOrder,
}

impl CudaPackage {
    /// Reads and parses `dir/manifest.json`.
    pub fn read_manifest(dir: &Path) -> Result<Manifest, CudaError> {
        let path = dir.join(Manifest::FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| CudaError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|error| CudaError::BadManifest {
                path: path.clone(),
                detail: error.to_string(),
            })?;
        if manifest.format != Manifest::FORMAT {
            return Err(CudaError::BadManifest {
                path,
                detail: format!(
                    "format version {}, but this runtime reads version {}",
                    manifest.format,
                    Manifest::FORMAT
                ),
            });
        }
        Ok(manifest)
    }

    /// Loads the package in `dir` (`manifest.json` and `kernels.fatbin`) on `device`.
    pub fn load(device: &CudaDevice, dir: &Path) -> Result<CudaPackage, CudaError> {
        let manifest = CudaPackage::read_manifest(dir)?;
        let fatbin_path = dir.join(Manifest::FATBIN);
        let image = std::fs::read(&fatbin_path).map_err(|source| CudaError::Io {
            path: fatbin_path,
            source,
        })?;
        CudaPackage::from_image(device, manifest, &image, dir.display().to_string())
    }

    /// Loads a package from a manifest and a module image (a fatbin, a cubin or PTX text)
    /// already in memory; `name` stands for the package in messages.
    pub fn from_image(
        device: &CudaDevice,
        manifest: Manifest,
        image: &[u8],
        name: impl Into<String>,
    ) -> Result<CudaPackage, CudaError> {
        let name = name.into();
        let module = ffi::load_module(device.context(), image).map_err(|failure| {
            let source = DriverFailure::from_driver(failure.error);
            let mut notes = module_load_hint(&source, device, &manifest);
            if !failure.jit_log.is_empty() {
                notes.push_str("\nJIT log:\n");
                notes.push_str(&failure.jit_log);
            }
            CudaError::ModuleLoad {
                package: name.clone(),
                source,
                notes,
            }
        })?;
        let module = Arc::new(module);
        let kernels = manifest
            .kernels
            .iter()
            .map(|kernel| {
                ffi::kernel_function(&module, &kernel.name).map_err(|error| {
                    CudaError::MissingKernel {
                        package: name.clone(),
                        kernel: kernel.name.clone(),
                        source: DriverFailure::from_driver(error),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Kernels beyond the static 48 KiB opt into their dynamic shared memory, once.
        for (kernel, function) in manifest.kernels.iter().zip(&kernels) {
            if kernel.dynamic_shared_bytes == 0 {
                continue;
            }
            let bytes = u32::try_from(kernel.dynamic_shared_bytes).unwrap_or(u32::MAX);
            ffi::allow_dynamic_shared(function, bytes).map_err(|error| {
                CudaError::SharedMemory {
                    package: name.clone(),
                    kernel: kernel.name.clone(),
                    bytes: kernel.dynamic_shared_bytes,
                    source: DriverFailure::from_driver(error),
                }
            })?;
        }
        let plan_launch_order =
            if dependent_launch_safe(&manifest, device.info().compute_capability) {
                LaunchOrder::DependsOnPrevious
            } else {
                LaunchOrder::Serial
            };
        Ok(CudaPackage {
            device: device.clone(),
            manifest,
            name,
            kernels,
            plan_launch_order,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The directory (or the name given to [`CudaPackage::from_image`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The index of kernel `name` in the manifest.
    pub fn kernel_index(&self, name: &str) -> Option<usize> {
        self.manifest
            .kernels
            .iter()
            .position(|kernel| kernel.name == name)
    }

    /// The index of the plan of entry function `function`.
    pub fn plan_index(&self, function: &str) -> Result<usize, CudaError> {
        self.manifest
            .plans
            .iter()
            .position(|plan| plan.function == function)
            .ok_or_else(|| CudaError::UnknownPlan {
                package: self.name.clone(),
                function: function.to_string(),
                available: self
                    .manifest
                    .plans
                    .iter()
                    .map(|plan| format!("`{}`", plan.function))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub(crate) fn plan_at(&self, index: usize) -> &Plan {
        &self.manifest.plans[index]
    }

    pub(crate) fn kernel_info(&self, index: usize) -> &KernelInfo {
        &self.manifest.kernels[index]
    }

    /// Launches kernel `kernel` over `grid` blocks (its block size comes from the
    /// manifest) with `args`, checked against its parameters. Asynchronous: call
    /// [`CudaDevice::synchronize`] or read a buffer to wait for it. An empty grid launches
    /// nothing.
    pub fn launch(
        &self,
        kernel: &str,
        grid: [u64; 3],
        args: &[KernelArg<'_>],
    ) -> Result<(), CudaError> {
        let (index, shape, mut values) = self.prepare_launch(kernel, grid, args)?;
        match shape {
            Some(shape) => self.launch_index(index, &shape, &mut values, LaunchOrder::Serial),
            None => Ok(()),
        }
    }

    /// Times `runs` launches of `kernel` (after warm-up) with CUDA events.
    pub fn time_kernel(
        &self,
        kernel: &str,
        grid: [u64; 3],
        args: &[KernelArg<'_>],
        runs: usize,
    ) -> Result<Timing, CudaError> {
        let (index, shape, values) = self.prepare_launch(kernel, grid, args)?;
        let shape = shape.ok_or_else(|| CudaError::BadLaunchShape {
            kernel: kernel.to_string(),
            detail: format!("grid {grid:?} is empty, there is nothing to time"),
        })?;
        time_on_device(&self.device, runs, &mut || {
            let mut values = values.clone();
            self.launch_index(index, &shape, &mut values, LaunchOrder::Serial)
        })
    }

    /// Launches the kernel at `index` with arguments already packed from its parameters,
    /// after the kernel before it on the stream (`order`; plan steps may use
    /// [`CudaPackage::plan_launch_order`]).
    pub(crate) fn launch_index(
        &self,
        index: usize,
        shape: &LaunchShape,
        args: &mut [ArgValue],
        order: LaunchOrder,
    ) -> Result<(), CudaError> {
        ffi::launch(
            self.device.stream(),
            &self.kernels[index],
            shape,
            args,
            order,
        )
        .map_err(|error| CudaError::Launch {
            kernel: self.manifest.kernels[index].name.clone(),
            shape: *shape,
            source: DriverFailure::from_driver(error),
        })
    }

    /// How the kernels of a plan may follow each other on this device: with programmatic
    /// dependent launch when every kernel the device runs waits for the one before it.
    pub(crate) fn plan_launch_order(&self) -> LaunchOrder {
        self.plan_launch_order
    }

    /// Finds the kernel, computes its launch shape and packs `args` against its parameters.
    fn prepare_launch(
        &self,
        kernel: &str,
        grid: [u64; 3],
        args: &[KernelArg<'_>],
    ) -> Result<(usize, Option<LaunchShape>, Vec<ArgValue>), CudaError> {
        let index = self
            .kernel_index(kernel)
            .ok_or_else(|| CudaError::UnknownKernel {
                package: self.name.clone(),
                kernel: kernel.to_string(),
            })?;
        let info = self.kernel_info(index);
        let shape = LaunchShape::new(kernel, grid, info.block_dim)?
            .map(|shape| shape.with_dynamic_shared(info))
            .transpose()?;
        let values = self.pack_args(info, args)?;
        Ok((index, shape, values))
    }

    fn pack_args(
        &self,
        info: &KernelInfo,
        args: &[KernelArg<'_>],
    ) -> Result<Vec<ArgValue>, CudaError> {
        let bad = |detail: String| CudaError::BadArguments {
            kernel: info.name.clone(),
            detail,
        };
        if args.len() != info.params.len() {
            return Err(bad(format!(
                "{} arguments for {} parameters ({})",
                args.len(),
                info.params.len(),
                parameter_names(info)
            )));
        }
        let mut values = Vec::with_capacity(args.len());
        for (index, (param, arg)) in info.params.iter().zip(args).enumerate() {
            let value = match (param, arg) {
                (ParamLayout::Buffer { name, dtype, .. }, KernelArg::Tensor(tensor))
                    if tensor.dtype() != *dtype =>
                {
                    return Err(bad(format!(
                        "parameter `{name}` is a {dtype} buffer, but the tensor is {}",
                        tensor.dtype()
                    )));
                }
                (ParamLayout::Buffer { .. }, KernelArg::Buffer(buffer)) => {
                    self.check_owned(info, index, buffer)?;
                    ArgValue::Address(buffer.address())
                }
                (ParamLayout::Buffer { .. }, KernelArg::Tensor(tensor)) => {
                    self.check_owned(info, index, tensor.buffer())?;
                    ArgValue::Address(tensor.buffer().address())
                }
                (ParamLayout::Scalar { ty, .. }, KernelArg::I64(v)) if ty == "i64" => {
                    ArgValue::I64(*v)
                }
                (ParamLayout::Scalar { ty, .. }, KernelArg::I32(v)) if ty == "i32" => {
                    ArgValue::I32(*v)
                }
                (ParamLayout::Scalar { ty, .. }, KernelArg::F32(v)) if ty == "f32" => {
                    ArgValue::F32(*v)
                }
                (ParamLayout::Scalar { ty, .. }, KernelArg::Pred(v)) if ty == "pred" => {
                    ArgValue::Pred(u8::from(*v))
                }
                (ParamLayout::Buffer { name, dtype, .. }, other) => {
                    return Err(bad(format!(
                        "parameter `{name}` is a {dtype} buffer, but argument {index} is {}",
                        argument_kind(other)
                    )));
                }
                (ParamLayout::Scalar { name, ty }, other) => {
                    return Err(bad(format!(
                        "parameter `{name}` is a {ty} scalar, but argument {index} is {}",
                        argument_kind(other)
                    )));
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    fn check_owned(
        &self,
        info: &KernelInfo,
        index: usize,
        buffer: &DeviceBuffer,
    ) -> Result<(), CudaError> {
        if self.device.owns(buffer) {
            Ok(())
        } else {
            Err(CudaError::ForeignBuffer {
                kernel: info.name.clone(),
                index,
            })
        }
    }
}

/// What kind of value an argument is, for messages.
fn argument_kind(arg: &KernelArg<'_>) -> String {
    match arg {
        KernelArg::Buffer(_) => "a buffer".to_string(),
        KernelArg::Tensor(tensor) => format!("a {} tensor", tensor.dtype()),
        KernelArg::I64(v) => format!("i64 {v}"),
        KernelArg::I32(v) => format!("i32 {v}"),
        KernelArg::F32(v) => format!("f32 {v}"),
        KernelArg::Pred(v) => format!("pred {v}"),
    }
}

/// What a module-load failure usually means for a kiln package.
/// Whether the module loaded from `manifest`'s fatbin on a device of `compute_capability`
/// waits in every kernel for the kernel before it: the manifest says its kernels for compute
/// capability 9.0 and later do, the device is one, and a cubin of such a target runs on it
/// (otherwise the driver runs JIT-compiled PTX of an older target, which has no wait).
fn dependent_launch_safe(manifest: &Manifest, compute_capability: (u32, u32)) -> bool {
    let (major, minor) = compute_capability;
    manifest.dependent_launch
        && major >= 9
        && manifest
            .targets
            .iter()
            .filter_map(|name| kiln_ptx::Target::parse(name).ok())
            .any(|target| target.compute_capability().0 >= 9 && target.cubin_runs_on(major, minor))
}

fn module_load_hint(failure: &DriverFailure, device: &CudaDevice, manifest: &Manifest) -> String {
    let (major, minor) = device.info().compute_capability;
    let targets = if manifest.targets.is_empty() {
        "none".to_string()
    } else {
        manifest.targets.join(", ")
    };
    let ptx = manifest.ptx_target.as_deref().unwrap_or("none");
    let driver = device.info().driver_version;
    if failure.is(CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION) {
        format!(
            "\nhint: no cubin in the fatbin runs on this sm_{major}{minor} GPU (cubins: \
             {targets}), and its PTX (for {ptx}) declares a .version newer than this driver \
             (CUDA {driver}) can JIT; embed PTX of .version 9.0 or lower, or compile for \
             sm_{major}{minor}"
        )
    } else if failure.is(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU) {
        format!(
            "\nhint: the fatbin has no cubin that runs on this sm_{major}{minor} GPU (cubins: \
             {targets}) and no PTX the driver can JIT for it (PTX: {ptx})"
        )
    } else if failure.is(CUresult::CUDA_ERROR_INVALID_PTX) {
        "\nhint: the driver's JIT rejected the embedded PTX; the JIT log below says why".to_string()
    } else if failure.is(CUresult::CUDA_ERROR_INVALID_IMAGE) {
        format!(
            "\nhint: `{}` is not a fatbin, cubin or PTX image the driver accepts (truncated, \
             or built for another architecture?)",
            Manifest::FATBIN
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(targets: &[&str], dependent_launch: bool) -> Manifest {
        Manifest {
            format: Manifest::FORMAT,
            program: "test".to_string(),
            config: serde_json::Map::new(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ptx_target: Some("sm_80".to_string()),
            dependent_launch,
            kernels: Vec::new(),
            plans: Vec::new(),
            weights: Vec::new(),
            resources: Vec::new(),
        }
    }

    #[test]
    fn dependent_launch_only_where_the_running_cubin_waits() {
        let all = manifest(&["sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120"], true);
        assert!(dependent_launch_safe(&all, (9, 0)));
        assert!(dependent_launch_safe(&all, (10, 0)));
        assert!(dependent_launch_safe(&all, (12, 0)));
        // Devices before Hopper have no dependent launch.
        assert!(!dependent_launch_safe(&all, (8, 0)));
        assert!(!dependent_launch_safe(&all, (8, 9)));
        // A Hopper device running JIT-compiled sm_80 PTX, or a device of an `a` target's
        // major with another minor, has no cubin with the wait.
        assert!(!dependent_launch_safe(&manifest(&["sm_80"], true), (9, 0)));
        assert!(!dependent_launch_safe(
            &manifest(&["sm_90a"], true),
            (10, 0)
        ));
        assert!(!dependent_launch_safe(
            &manifest(&["sm_100a"], true),
            (10, 3)
        ));
        // A manifest written before kiln emitted the wait.
        assert!(!dependent_launch_safe(
            &manifest(&["sm_90a"], false),
            (9, 0)
        ));
    }

    #[test]
    fn manifests_without_the_field_read_as_serial() {
        let mut json = serde_json::to_value(manifest(&["sm_90a"], true)).unwrap();
        json.as_object_mut().unwrap().remove("dependent_launch");
        let read: Manifest = serde_json::from_value(json).unwrap();
        assert!(!read.dependent_launch);
    }
}
