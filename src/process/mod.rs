//! What every process uses: Unix signals, process titles, the state
//! directory shared by master, workers and admin, logging, and the change
//! of user (`user`).

pub mod logging;
pub mod privilege;
pub mod proctitle;
pub mod signals;
pub mod state;
