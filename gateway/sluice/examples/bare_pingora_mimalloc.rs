//! A bench peer, not part of Sluice: `bare_pingora.rs` on mimalloc, the allocator Sluice runs on.
//! Stock Pingora uses the system allocator, and mimalloc alone takes ~14 % of its instructions per
//! request away; measured beside this peer, Sluice's ratio is what its own code adds.
//!
//!     cargo run --release --example bare_pingora_mimalloc -- LISTEN-ADDRESS UPSTREAM-ADDRESS

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "bare_pingora.rs"]
mod bare_pingora;

fn main() -> anyhow::Result<()> {
    bare_pingora::main()
}
