//! nid-cell: one replica of a cell, as a library (the `nid-cell` binary and the in-process test
//! cell both run it). It composes the replication engine (`nid-engine`) with the state machine of
//! its role, the identity machine of a data cell (`nid-identity`) or the control machine
//! (`nid-control`), and serves them over gRPC.
//!
//! - [`identity_cell`]: a data cell's identity operations on the leader (validate, prepare,
//!   propose, answer), [`key_rotation`] and [`sweeper`] beside them.
//! - [`cell_service`], [`bucket_admin`], [`control_service`]: the gRPC services; [`replica`]: what
//!   every replica answers about itself.
//! - [`error`]: the one error type, mapped to gRPC statuses in one place.
//! - [`server`], [`config`], [`metrics`], [`readiness`]: the process; [`access`]: who may call
//!   which service over mutual TLS, and how a replica dials others.
//!
//! Invariant: handlers never build statuses themselves; every failure is a [`error::CellError`].

pub mod access;
pub mod bucket_admin;
pub mod cell_service;
pub mod config;
pub mod control_service;
pub mod error;
pub mod identity_cell;
pub mod key_rotation;
pub mod metrics;
pub mod readiness;
pub mod rebalancer;
pub mod replica;
pub mod server;
pub mod sweeper;
