//! Helpers shared by the worker's integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod fake_broker;
