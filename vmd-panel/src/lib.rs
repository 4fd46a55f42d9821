//! `vmd-panel`: the GUI VM's desktop panel for vmd, a GTK4 window that
//! shows the host and every VM the client's identity may see, follows
//! their state through `Watch` long-polls, draws CPU and memory graphs
//! while it is visible (and sends nothing at all while it is hidden or
//! minimised), and offers the changes the identity's role allows.
//!
//! It reads the same `client.toml` as `vmctl` (`--config`, else
//! `$XDG_CONFIG_HOME/vmd/client.toml`, else `/etc/vmd/client.toml`) and
//! takes the same connection flags; `auto` tries vsock to the host first,
//! then TCP.
//!
//! # Layout
//!
//! - `src/main.rs`: the command line, the settings, the GTK application.
//! - [`model`]: what the window shows, without GTK (unit-tested).
//! - [`link`]: the connection to vmd on a thread of its own.
//! - [`ui`]: the window and its widgets.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod link;
pub mod model;
pub mod ui;
