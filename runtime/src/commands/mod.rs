pub mod bench;
pub mod forward;
pub mod tokenize;
