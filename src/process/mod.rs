//! What every process uses: Unix signals, process titles, the state
//! directory shared by master, workers and admin, and logging.

pub mod logging;
pub mod proctitle;
pub mod signals;
pub mod state;
