/// Pingora allocates and frees many small objects per request; mimalloc serves them with about a
/// fifth fewer instructions than glibc's malloc (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
