//! flotilla's types, file parsing and validation. No IO: callers hand in text and a file name.

pub mod file;
pub mod object;
pub mod quantity;
pub mod service;

pub use file::{FlotillaFile, UpConfig};
pub use object::*;
pub use quantity::{ByteSize, Dur, Millicores};
pub use service::*;
