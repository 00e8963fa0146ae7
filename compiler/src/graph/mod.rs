//! The typed graph of a model: expansion from the model language, binding to a checkpoint's
//! tensors, and petgraph views for analyses.

pub mod expand;
pub mod print;

pub use expand::expand;
