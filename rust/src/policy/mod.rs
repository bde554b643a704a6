//! The order-selection policies the simulator compares (not kernel files:
//! the seed patch and its review proposed two of them). Each is the part of
//! `alloc_anon_folio()` that picks and tries orders, written as its author
//! named it; [`crate::mm::memory`] calls the configured one and falls back
//! to order 0 (`folio_prealloc`) when it returns `None`.
//!
//! All three get `orders`, the VMA's allowable PTE-mapped orders for this
//! fault (`thp_vma_allowable_orders()` below the PMD order, never order 1),
//! and the PTE table to estimate against without its lock.

pub mod preferred;
pub mod upstream;
pub mod v1;
