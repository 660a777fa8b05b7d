//! Staying up under overload: a cap on each listener's open connections, and a guard that
//! sheds new work while the process's resident memory is near its configured limit.

mod conn_limit;
mod memory;

pub use conn_limit::{ConnLimit, ConnSlot};
pub use memory::{MemoryGuard, PressureChange, REFRESH_INTERVAL, next_overloaded, parse_vm_rss};
