//! What a device already holds, so `format` refuses to destroy a user's data by a mistyped
//! path, as mkfs and pvcreate do: a known filesystem or partition-table signature, or any
//! non-zero byte in the first MiB.

use std::io;

use crate::blockdev::BlockDev;

/// How much of the start of a device is looked at.
const PROBE_LEN: u64 = 1 << 20;

/// Signatures at fixed offsets, named in the refusal (blkid's table is the reference).
const SIGNATURES: &[(&str, u64, &[u8])] = &[
    ("an ext2/3/4 filesystem", 1080, &[0x53, 0xef]),
    ("an XFS filesystem", 0, b"XFSB"),
    ("a btrfs filesystem", 65_600, b"_BHRfS_M"),
    ("an LVM2 physical volume", 536, b"LVM2 001"),
    ("a GPT partition table", 512, b"EFI PART"),
    ("a swap area", 4086, b"SWAPSPACE2"),
    ("a LUKS container", 0, b"LUKS\xba\xbe"),
    ("an MBR partition table or boot sector", 510, &[0x55, 0xaa]),
];

/// `Some(description)` when the device holds data a format would destroy.
pub(crate) fn find_data(dev: &dyn BlockDev) -> io::Result<Option<String>> {
    let len = dev.len()?.min(PROBE_LEN);
    let mut head = vec![0u8; len as usize];
    dev.read_at(&mut head, 0)?;
    for &(name, offset, magic) in SIGNATURES {
        let at = offset as usize;
        if head.get(at..at + magic.len()) == Some(magic) {
            return Ok(Some(format!("{name} signature at byte {offset}")));
        }
    }
    Ok(head
        .iter()
        .position(|&b| b != 0)
        .map(|at| format!("non-zero data at byte {at} of the first MiB")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crashsim::SimDisk;

    fn disk_with(bytes: &[(u64, &[u8])]) -> SimDisk {
        let mut image = vec![0u8; 2 << 20];
        for &(at, b) in bytes {
            image[at as usize..at as usize + b.len()].copy_from_slice(b);
        }
        SimDisk::new("/sim/d", image, false)
    }

    #[test]
    fn signatures_and_data_are_found_and_zeros_are_not() {
        assert_eq!(find_data(&disk_with(&[])).unwrap(), None);
        let found = find_data(&disk_with(&[(1080, &[0x53, 0xef])]))
            .unwrap()
            .unwrap();
        assert!(found.contains("ext2/3/4"), "{found}");
        let found = find_data(&disk_with(&[(510, &[0x55, 0xaa])]))
            .unwrap()
            .unwrap();
        assert!(found.contains("MBR"), "{found}");
        let found = find_data(&disk_with(&[((1 << 20) - 1, &[1])]))
            .unwrap()
            .unwrap();
        assert!(found.contains("byte 1048575"), "{found}");
        // Past the first MiB is not looked at.
        assert_eq!(find_data(&disk_with(&[(1 << 20, &[1])])).unwrap(), None);
    }
}
