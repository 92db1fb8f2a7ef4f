//! Kernel templates and the fusion that picks them.
