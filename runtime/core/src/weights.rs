//! Checkpoint tensors: safetensors files (one, or several through
//! `model.safetensors.index.json`) memory-mapped and converted to the dtypes a lowered program
//! declares, or random weights from a seed.

use crate::progress::{NoProgress, Progress, ProgressUnit};
use crate::RuntimeError;
use kiln_ir::interp::ParamSource;
use kiln_ir::{DType, IrError, Tensor, TensorType};
use kiln_lower::ParamBinding;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors a program reads, by checkpoint name, converted to their declared types.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Loads exactly the tensors `bindings` name from the checkpoint in `dir`, checking each
    /// shape and converting each to the declared dtype.
    pub fn load(dir: &Path, bindings: &[ParamBinding]) -> Result<Weights, RuntimeError> {
        Weights::load_with_progress(dir, bindings, &mut NoProgress)
    }

    /// [`Weights::load`], reporting the bytes of the declared tensors converted so far.
    pub fn load_with_progress(
        dir: &Path,
        bindings: &[ParamBinding],
        progress: &mut dyn Progress,
    ) -> Result<Weights, RuntimeError> {
        let files = checkpoint_files(dir)?;
        let mut maps = Vec::new();
        for file in &files {
            let handle = std::fs::File::open(file).map_err(|e| RuntimeError::io(file, e))?;
            // SAFETY: the map is read-only and lives only while this function reads from it;
            // a checkpoint file changed on disk meanwhile yields wrong values, never UB in
            // safe code that copies bytes out of it.
            #[allow(unsafe_code)]
            let map =
                unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| RuntimeError::io(file, e))?;
            maps.push((file.clone(), map));
        }
        let mut parsed = Vec::new();
        for (file, map) in &maps {
            let st = safetensors::SafeTensors::deserialize(map).map_err(|e| {
                RuntimeError::Checkpoint {
                    path: file.clone(),
                    message: e.to_string(),
                }
            })?;
            parsed.push((file, st));
        }
        let total_bytes: u64 = bindings.iter().map(|b| declared_bytes(&b.ty)).sum();
        progress.start(
            &format!("loading {} tensors", bindings.len()),
            total_bytes,
            ProgressUnit::Bytes,
        );
        let mut done_bytes = 0;
        let mut tensors = BTreeMap::new();
        for binding in bindings {
            let found = parsed
                .iter()
                .find_map(|(file, st)| st.tensor(&binding.checkpoint_name).ok().map(|v| (file, v)));
            let Some((file, view)) = found else {
                return Err(RuntimeError::MissingTensor {
                    name: binding.checkpoint_name.clone(),
                    expected: binding.ty.clone(),
                    dir: dir.to_path_buf(),
                });
            };
            let tensor = convert(view, &binding.ty).map_err(|message| RuntimeError::BadTensor {
                name: binding.checkpoint_name.clone(),
                path: (*file).clone(),
                message,
            })?;
            tensors.insert(binding.checkpoint_name.clone(), tensor);
            done_bytes += declared_bytes(&binding.ty);
            progress.advance(done_bytes);
        }
        progress.finish();
        Ok(Weights { tensors })
    }

    /// Random weights for `bindings`: uniform in ±scale/√(last dim) (norm weights, 1-d, near
    /// 1), reproducible from `seed`.
    pub fn random(bindings: &[ParamBinding], seed: u64) -> Result<Weights, RuntimeError> {
        let mut tensors = BTreeMap::new();
        for (i, binding) in bindings.iter().enumerate() {
            let dims: Option<Vec<usize>> = binding
                .ty
                .shape
                .0
                .iter()
                .map(|d| d.as_const().map(|n| n as usize))
                .collect();
            let Some(dims) = dims else {
                return Err(RuntimeError::Input(format!(
                    "param {} has a symbolic shape",
                    binding.checkpoint_name
                )));
            };
            let n: usize = dims.iter().product();
            let mut state =
                seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
            let mut next = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            };
            let data: Vec<f32> = if dims.len() == 1 {
                (0..n).map(|_| (1.0 + 0.1 * next()) as f32).collect()
            } else {
                let fan_in = *dims.last().unwrap_or(&1) as f64;
                (0..n)
                    .map(|_| (next() * 1.7 / fan_in.sqrt()) as f32)
                    .collect()
            };
            let t = Tensor::from_f32(&dims, data).cast(binding.ty.dtype);
            tensors.insert(binding.checkpoint_name.clone(), t);
        }
        Ok(Weights { tensors })
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total bytes of the weights in their declared dtypes.
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.numel() * t.dtype.size_bytes())
            .sum()
    }
}

/// The bytes a tensor of type `ty` takes (0 for a symbolic shape, which no param has).
fn declared_bytes(ty: &TensorType) -> u64 {
    ty.shape
        .0
        .iter()
        .map(|d| d.as_const().unwrap_or(0))
        .product::<u64>()
        * ty.dtype.size_bytes() as u64
}

impl ParamSource for Weights {
    fn param(&self, name: &str, ty: &TensorType) -> Result<Tensor, IrError> {
        self.tensors.param(name, ty)
    }
}

/// The safetensors files of a checkpoint directory (or the file itself).
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| RuntimeError::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RuntimeError::Checkpoint {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let mut files: Vec<PathBuf> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str())
                    .map(|f| dir.join(f))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(RuntimeError::Checkpoint {
                path: index,
                message: "no weight_map entries".into(),
            });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(RuntimeError::Checkpoint {
        path: dir.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json in this directory".into(),
    })
}

/// Converts one stored tensor to the declared type, checking the shape.
fn convert(view: safetensors::tensor::TensorView<'_>, ty: &TensorType) -> Result<Tensor, String> {
    let shape: Vec<usize> = view.shape().to_vec();
    let want: Option<Vec<usize>> = ty
        .shape
        .0
        .iter()
        .map(|d| d.as_const().map(|n| n as usize))
        .collect();
    if want.as_deref() != Some(shape.as_slice()) {
        return Err(format!(
            "expected shape {}, found {:?} in the checkpoint",
            ty.shape, shape
        ));
    }
    let bytes = view.data();
    let t = match view.dtype() {
        safetensors::Dtype::F32 => Tensor::from_f32(
            &shape,
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        safetensors::Dtype::BF16 => Tensor::from_floats(
            DType::BF16,
            &shape,
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        safetensors::Dtype::F16 => Tensor::from_floats(
            DType::F16,
            &shape,
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        safetensors::Dtype::I64 => Tensor::from_ints(
            DType::I64,
            &shape,
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        safetensors::Dtype::I32 => Tensor::from_ints(
            DType::I32,
            &shape,
            bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        other => {
            return Err(format!(
                "the checkpoint stores it as {other:?}, which kiln cannot read yet"
            ))
        }
    };
    Ok(t.cast(ty.dtype))
}

/// Reads every tensor of a safetensors file as stored (for fixtures and inputs).
pub fn read_all(path: &Path) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| RuntimeError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dims: Vec<kiln_ir::Dim> = view
            .shape()
            .iter()
            .map(|n| kiln_ir::Dim::Const(*n as u64))
            .collect();
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::I32 => DType::I32,
            other => {
                return Err(RuntimeError::BadTensor {
                    name,
                    path: path.to_path_buf(),
                    message: format!("unsupported dtype {other:?}"),
                })
            }
        };
        let t = convert(view, &TensorType::new(dtype, dims)).map_err(|message| {
            RuntimeError::BadTensor {
                name: name.clone(),
                path: path.to_path_buf(),
                message,
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}
