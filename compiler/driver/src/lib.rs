//! kiln's compiler driver as a library: the pipeline from a lowered program to a package
//! (kernels, plans, PTX per target, cubins, fatbin, manifest), shared by the `kiln` binary
//! and the test suites; and the choice of backend a program runs on.

pub mod backend;
pub mod pipeline;
pub mod serve;
