static EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spicegate"));
fn main() { println!("{}", EBPF.len()); }
