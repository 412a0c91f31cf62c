//! Errors: what a registry says when an export cannot be opened, and how an export's
//! `std::io::Error` becomes one of the few error values the NBD protocol allows.

use crate::proto;

/// Why [`crate::ExportRegistry::open`] could not open an export.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No export by that name; the client gets `NBD_REP_ERR_UNKNOWN`.
    #[error("no such export")]
    NotFound,
    /// The export exists but cannot be served now (for example an invalidated snapshot);
    /// the client gets `NBD_REP_ERR_UNKNOWN` with this text as the message.
    #[error("export unavailable: {0}")]
    Unavailable(String),
}

/// Map an export's I/O error to an NBD error value.
///
/// The protocol defines only a handful of values (they happen to equal Linux errnos), so raw
/// OS errors in that set pass through, a few others fold into their nearest neighbour as the
/// spec asks (EDQUOT/EFBIG → ENOSPC), error kinds map by meaning, and everything else is EIO.
pub fn nbd_errno(e: &std::io::Error) -> u32 {
    if let Some(raw) = e.raw_os_error() {
        match raw {
            libc::EPERM => return proto::EPERM,
            libc::EIO => return proto::EIO,
            libc::ENOMEM => return proto::ENOMEM,
            libc::EINVAL => return proto::EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => return proto::ENOSPC,
            libc::EOVERFLOW => return proto::EOVERFLOW,
            // (EOPNOTSUPP is the same number on Linux.)
            libc::ENOTSUP => return proto::ENOTSUP,
            libc::ESHUTDOWN => return proto::ESHUTDOWN,
            libc::EROFS | libc::EACCES => return proto::EPERM,
            _ => {}
        }
    }
    use std::io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => proto::EPERM,
        K::InvalidInput => proto::EINVAL,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => proto::ENOSPC,
        K::Unsupported => proto::ENOTSUP,
        K::OutOfMemory => proto::ENOMEM,
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn raw_errnos_pass_through() {
        for (raw, want) in [
            (libc::EPERM, proto::EPERM),
            (libc::EIO, proto::EIO),
            (libc::ENOMEM, proto::ENOMEM),
            (libc::EINVAL, proto::EINVAL),
            (libc::ENOSPC, proto::ENOSPC),
            (libc::EOVERFLOW, proto::EOVERFLOW),
            (libc::ENOTSUP, proto::ENOTSUP),
            (libc::ESHUTDOWN, proto::ESHUTDOWN),
            (libc::EDQUOT, proto::ENOSPC),
            (libc::EBADF, proto::EIO),
        ] {
            assert_eq!(
                nbd_errno(&Error::from_raw_os_error(raw)),
                want,
                "errno {raw}"
            );
        }
    }

    #[test]
    fn kinds_map_by_meaning() {
        assert_eq!(
            nbd_errno(&Error::from(ErrorKind::PermissionDenied)),
            proto::EPERM
        );
        assert_eq!(
            nbd_errno(&Error::from(ErrorKind::InvalidInput)),
            proto::EINVAL
        );
        assert_eq!(
            nbd_errno(&Error::from(ErrorKind::StorageFull)),
            proto::ENOSPC
        );
        assert_eq!(
            nbd_errno(&Error::from(ErrorKind::Unsupported)),
            proto::ENOTSUP
        );
        assert_eq!(nbd_errno(&Error::other("boom")), proto::EIO);
        assert_eq!(
            nbd_errno(&Error::from(ErrorKind::UnexpectedEof)),
            proto::EIO
        );
    }
}
