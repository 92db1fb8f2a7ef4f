//! PTX emission and the ptxas/fatbinary toolchain.
