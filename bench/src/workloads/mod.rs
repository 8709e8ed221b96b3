//! The workloads of the benchmark, each measuring against an already running broker.

pub(crate) mod scaling;
pub(crate) mod w1;
pub(crate) mod w2;
pub(crate) mod w3;
