//! Managing keys and operators (KeyAdmin, `keygate user`): the use cases behind the admin
//! listener and the CLI.

mod error;
pub mod keys;
pub mod operators;

pub use error::AdminError;
