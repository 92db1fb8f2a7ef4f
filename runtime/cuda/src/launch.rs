//! Launch shapes: the grid and block of one kernel launch, computed from the manifest's
//! size expressions with the bound symbols and checked against the limits every CUDA GPU
//! since compute capability 3.0 shares. A grid with a zero extent means "nothing to do":
//! the launch is skipped, not an error.

use std::fmt;

use kiln_kir::manifest::KernelInfo;

use crate::binding::SymbolValues;
use crate::error::CudaError;

/// The most blocks along x, y and z.
pub const MAX_GRID: [u64; 3] = [(1 << 31) - 1, 65_535, 65_535];
/// The most threads in one block.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;

/// The grid and block of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchShape {
    /// Blocks along x, y, z.
    pub grid: [u32; 3],
    /// Threads per block along x, y, z (kiln's kernels are 1-D: `[block_dim, 1, 1]`).
    pub block: [u32; 3],
    /// Dynamic shared memory per block: the manifest's `dynamic_shared_bytes` (0 for
    /// kernels whose shared arrays are declared statically).
    pub dynamic_shared_bytes: u32,
}

impl LaunchShape {
    /// A 1-D block of `block_dim` threads over `grid`; `Ok(None)` when the grid has a zero
    /// extent (the launch has no work), an error naming `kernel` when a limit is exceeded.
    pub fn new(
        kernel: &str,
        grid: [u64; 3],
        block_dim: u32,
    ) -> Result<Option<LaunchShape>, CudaError> {
        if block_dim == 0 || block_dim > MAX_THREADS_PER_BLOCK {
            return Err(CudaError::BadLaunchShape {
                kernel: kernel.to_string(),
                detail: format!(
                    "block of {block_dim} threads; a block has 1 to {MAX_THREADS_PER_BLOCK}"
                ),
            });
        }
        if grid.contains(&0) {
            return Ok(None);
        }
        let mut blocks = [0u32; 3];
        for (axis, ((&extent, &limit), block)) in
            grid.iter().zip(&MAX_GRID).zip(&mut blocks).enumerate()
        {
            if extent > limit {
                return Err(CudaError::BadLaunchShape {
                    kernel: kernel.to_string(),
                    detail: format!(
                        "grid ({}, {}, {}) has {extent} blocks along {}, more than the \
                         {limit} a grid may have",
                        grid[0],
                        grid[1],
                        grid[2],
                        ["x", "y", "z"][axis]
                    ),
                });
            }
            *block = extent as u32;
        }
        Ok(Some(LaunchShape {
            grid: blocks,
            block: [block_dim, 1, 1],
            dynamic_shared_bytes: 0,
        }))
    }

    /// The launch shape of `kernel` with `symbols`: its grid expressions evaluated, its
    /// block size from the manifest. `Ok(None)` when the grid is empty.
    pub fn for_kernel(
        kernel: &KernelInfo,
        symbols: &SymbolValues,
    ) -> Result<Option<LaunchShape>, CudaError> {
        let mut grid = [0u64; 3];
        for (axis, (extent, expr)) in grid.iter_mut().zip(&kernel.grid).enumerate() {
            *extent = symbols
                .eval(expr)
                .ok_or_else(|| CudaError::BadLaunchShape {
                    kernel: kernel.name.clone(),
                    detail: format!(
                        "grid extent {axis} `{expr}` cannot be evaluated with {symbols}"
                    ),
                })?;
        }
        LaunchShape::new(&kernel.name, grid, kernel.block_dim)?
            .map(|shape| shape.with_dynamic_shared(kernel))
            .transpose()
    }

    /// This shape with `kernel`'s dynamic shared memory (an error beyond what a launch
    /// may pass).
    pub fn with_dynamic_shared(mut self, kernel: &KernelInfo) -> Result<LaunchShape, CudaError> {
        self.dynamic_shared_bytes =
            u32::try_from(kernel.dynamic_shared_bytes).map_err(|_| CudaError::BadLaunchShape {
                kernel: kernel.name.clone(),
                detail: format!(
                    "{} bytes of dynamic shared memory",
                    kernel.dynamic_shared_bytes
                ),
            })?;
        Ok(self)
    }

    /// Threads in the whole launch.
    pub fn threads(&self) -> u64 {
        self.grid
            .iter()
            .chain(&self.block)
            .map(|&extent| u64::from(extent))
            .product()
    }
}

impl fmt::Display for LaunchShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [gx, gy, gz] = self.grid;
        let [bx, by, bz] = self.block;
        write!(f, "grid ({gx}, {gy}, {gz}), block ({bx}, {by}, {bz})")?;
        if self.dynamic_shared_bytes > 0 {
            write!(
                f,
                ", {} bytes of dynamic shared memory",
                self.dynamic_shared_bytes
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_kir::SizeExpr;

    fn kernel(grid_x: SizeExpr, block_dim: u32) -> KernelInfo {
        KernelInfo {
            name: "k".to_string(),
            params: Vec::new(),
            block_dim,
            grid: [grid_x, SizeExpr::Const(1), SizeExpr::Const(1)],
            shared_bytes: 0,
            dynamic_shared_bytes: 0,
        }
    }

    fn ceil_div_n(by: u64) -> SizeExpr {
        SizeExpr::CeilDiv(
            Box::new(SizeExpr::Sym("n".to_string())),
            Box::new(SizeExpr::Const(by)),
        )
    }

    #[test]
    fn grids_come_from_the_symbols() {
        let symbols = SymbolValues::from_pairs([("n", 1000)]);
        let shape = LaunchShape::for_kernel(&kernel(ceil_div_n(128), 128), &symbols)
            .unwrap()
            .unwrap();
        assert_eq!(shape.grid, [8, 1, 1]);
        assert_eq!(shape.block, [128, 1, 1]);
        assert_eq!(shape.threads(), 1024);
        assert_eq!(shape.to_string(), "grid (8, 1, 1), block (128, 1, 1)");
    }

    #[test]
    fn dynamic_shared_memory_comes_from_the_manifest() {
        let symbols = SymbolValues::from_pairs([("n", 1000)]);
        let mut info = kernel(ceil_div_n(256), 256);
        info.shared_bytes = 96 * 1024;
        info.dynamic_shared_bytes = 96 * 1024 + 16;
        let shape = LaunchShape::for_kernel(&info, &symbols).unwrap().unwrap();
        assert_eq!(shape.dynamic_shared_bytes, 98_320);
        assert_eq!(
            shape.to_string(),
            "grid (4, 1, 1), block (256, 1, 1), 98320 bytes of dynamic shared memory"
        );
        // Static kernels launch with none.
        info.dynamic_shared_bytes = 0;
        let shape = LaunchShape::for_kernel(&info, &symbols).unwrap().unwrap();
        assert_eq!(shape.dynamic_shared_bytes, 0);
        // More than 32 bits is no launch.
        info.dynamic_shared_bytes = 1 << 32;
        let error = LaunchShape::for_kernel(&info, &symbols)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("4294967296 bytes of dynamic shared memory"),
            "{error}"
        );
        // An empty grid is still no launch.
        let empty = SymbolValues::from_pairs([("n", 0)]);
        assert_eq!(LaunchShape::for_kernel(&info, &empty).unwrap(), None);
    }

    #[test]
    fn an_empty_grid_skips_the_launch() {
        let symbols = SymbolValues::from_pairs([("n", 0)]);
        assert_eq!(
            LaunchShape::for_kernel(&kernel(ceil_div_n(128), 128), &symbols).unwrap(),
            None
        );
    }

    #[test]
    fn limits_and_unbound_symbols_are_errors_naming_the_kernel() {
        let unbound = LaunchShape::for_kernel(&kernel(ceil_div_n(128), 128), &SymbolValues::new())
            .unwrap_err()
            .to_string();
        assert!(
            unbound.starts_with("kernel `k`: grid extent 0 `ceil_div(n, 128)`"),
            "{unbound}"
        );
        let too_many = LaunchShape::new("k", [1, 70_000, 1], 32)
            .unwrap_err()
            .to_string();
        assert!(too_many.contains("70000 blocks along y"), "{too_many}");
        let big_block = LaunchShape::new("k", [1, 1, 1], 2048)
            .unwrap_err()
            .to_string();
        assert_eq!(
            big_block,
            "kernel `k`: block of 2048 threads; a block has 1 to 1024"
        );
    }
}
