//! Graph-IR passes and the pipeline that runs them.
