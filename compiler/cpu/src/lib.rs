//! The Cranelift CPU backend for kernel IR.
