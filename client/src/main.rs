//! `taskctl`: the command-line client of taskd.
fn main() {}
