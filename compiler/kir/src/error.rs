//! The error of this crate: a verifier finding or a failure of the reference interpreter,
//! always naming the kernel and, where there is one, the offending statement.

/// Something wrong with a kernel, found by the verifier or while interpreting it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("kernel `{kernel}`, {location}: {message}")]
pub struct KirError {
    /// The kernel's name.
    pub kernel: String,
    /// Where in the kernel: `header` for its declarations, `launch` for the arguments of a
    /// run, or a statement as its path and its first printed line, e.g.
    /// ``statement body[3].then[0] `out[i] = x` ``.
    pub location: String,
    pub message: String,
}

impl KirError {
    pub fn new(
        kernel: impl Into<String>,
        location: impl Into<String>,
        message: impl Into<String>,
    ) -> KirError {
        KirError {
            kernel: kernel.into(),
            location: location.into(),
            message: message.into(),
        }
    }
}
