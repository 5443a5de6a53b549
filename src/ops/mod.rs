//! What an operator sees and steers: a worker's figures, the status
//! aggregated from the state directory, the admin process (metrics,
//! health, status page, controls, the dispatch log browser), and `mkc
//! demo`.

pub mod admin;
pub mod demo;
pub mod figures;
pub mod log_browser;
pub mod status;
