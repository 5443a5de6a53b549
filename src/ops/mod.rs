//! What an operator sees and steers: a worker's figures, the status
//! aggregated from the state directory, the admin process (metrics,
//! health, status page, controls), and `mkc demo`.

pub mod admin;
pub mod demo;
pub mod figures;
pub mod status;
