//! Deciding one request (SPEC section 3): the authorizer and what it is made of, the cache of
//! keys held in memory, the shared store reads of first uses, the failure budget, operators'
//! passwords and the argon2 pool that checks them, and the batched record of key use.

pub mod argon_pool;
pub mod authorizer;
pub mod cache;
pub mod key_reads;
pub mod lockout;
pub mod passwords;
pub mod rate_limit;
pub mod usage;
