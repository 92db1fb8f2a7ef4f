//! kiln's compiler driver as a library: the pipeline from a lowered program to a package
//! (kernels, plans, PTX per target, cubins, fatbin, manifest), shared by the `kiln` binary
//! and the test suites.

pub mod pipeline;
