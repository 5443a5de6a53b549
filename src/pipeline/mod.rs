//! What happens to a message once a worker has it: the envelope parse,
//! routing by commandId, the lanes of a worker, and HTTP delivery.
//!
//! ```text
//! worker (lanes) ─► envelope::parse ─► router ─► dispatch (HTTP, delay, retry) ─► Outcome
//!                                                    └─ gate (rate limit, circuit breaker)
//! ```

pub mod dispatch;
pub mod envelope;
pub mod gate;
pub mod request;
pub mod router;
pub mod worker;
