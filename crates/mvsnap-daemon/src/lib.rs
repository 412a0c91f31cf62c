//! The control plane between the CLI and the engine. A daemon (`serve`) owns a store and serves
//! every volume over NBD; [`Session`] lets the CLI run the same commands against the daemon
//! through its control socket, or against the store directly when no daemon serves it.

pub mod control;
pub mod daemon;
pub mod display;
pub mod exports;
pub mod files;
pub mod memory;
pub mod paths;
pub mod service;
mod session;
pub mod users;

pub use daemon::{check_listen, serve, ServeOptions};
pub use mvsnap_nbd::TlsFiles;
pub use session::Session;
