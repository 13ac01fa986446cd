//! Pure domain logic: no tonic, no sqlx, no I/O. Header parsing, the key format, the key
//! digest, password hashing, the records and the pieces of the authorization decision.

pub mod credentials;
pub mod decision;
pub mod digest;
pub mod hashing;
pub mod key;
pub mod model;
pub mod validation;
