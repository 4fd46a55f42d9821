//! Reading and atomically writing PKI files.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{IssuedCert, KeyPairPem, PkiError};

/// Mode of private key files.
pub(super) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(super) const CERT_MODE: u32 = 0o644;
/// Mode of directories this module creates.
pub(super) const DIR_MODE: u32 = 0o700;

/// Writes a certificate (mode 0644) and its key (mode 0600), each
/// atomically: a temporary file is created in the same directory with the
/// final mode, synced, and moved into place. Missing parent directories are
/// created with mode 0700.
///
/// A key file is never replaced: if `key_path` already holds exactly
/// `issued.key_pem` (a renewal for an existing key) it is left alone.
///
/// # Errors
///
/// [`PkiError::KeyExists`] if `key_path` holds a different key;
/// [`PkiError::CreateDir`], [`PkiError::Read`] or [`PkiError::Write`] on
/// I/O failure.
pub fn write_issued(
    cert_path: &Path,
    key_path: &Path,
    issued: &IssuedCert,
) -> Result<(), PkiError> {
    match read_optional(key_path)? {
        Some(existing) if existing == issued.key_pem.as_bytes() => {}
        Some(_) => {
            return Err(PkiError::KeyExists {
                path: key_path.to_owned(),
            });
        }
        None => write_new_key(key_path, &issued.key_pem)?,
    }
    write_cert(cert_path, &issued.cert_pem)
}

/// Reads a file, or `None` if it does not exist.
pub(super) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PkiError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads and parses a key file, or `None` if it does not exist. Warns if
/// the file is accessible by group or others.
pub(super) fn read_optional_key(path: &Path) -> Result<Option<KeyPairPem>, PkiError> {
    let Some(bytes) = read_optional(path)? else {
        return Ok(None);
    };
    let key = KeyPairPem::parse(&bytes, path)?;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "private key file is accessible by group or others"
            );
        }
    }
    Ok(Some(key))
}

/// Reads the first certificate of a PEM file.
pub(super) fn read_cert_der(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_cert_pem(&bytes, path)
}

/// Parses the first certificate of PEM `bytes` read from `path`.
pub(super) fn parse_cert_pem(
    bytes: &[u8],
    path: &Path,
) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(bytes).map_err(|source| PkiError::CertPem {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new key file with mode 0600; fails with
/// [`PkiError::KeyExists`] rather than replace an existing file.
pub(super) fn write_new_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_atomic(path, pem.as_bytes(), KEY_MODE, Replace::Never)
}

/// Writes (or atomically replaces) a certificate file with mode 0644.
pub(super) fn write_cert(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_atomic(path, pem.as_bytes(), CERT_MODE, Replace::Allowed)
}

/// Creates `dir` and its missing ancestors with mode 0700.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| PkiError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    Allowed,
    Never,
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32, replace: Replace) -> Result<(), PkiError> {
    let write_err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_private_dir(dir)?;
    let (tmp_path, mut file) = create_temp(dir, path, mode).map_err(write_err)?;
    let result = (|| {
        file.write_all(contents)?;
        // The mode given at creation is reduced by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        match replace {
            Replace::Allowed => fs::rename(&tmp_path, path),
            // A hard link fails if the target exists, so a key that appeared
            // in the meantime is never clobbered.
            Replace::Never => {
                fs::hard_link(&tmp_path, path)?;
                fs::remove_file(&tmp_path)
            }
        }
    })();
    if let Err(e) = result {
        // Best effort: the temporary file is useless now.
        let _ = fs::remove_file(&tmp_path);
        if replace == Replace::Never && e.kind() == io::ErrorKind::AlreadyExists {
            return Err(PkiError::KeyExists {
                path: path.to_owned(),
            });
        }
        return Err(write_err(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PkiError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Creates a fresh temporary file next to `target`, with `mode` from the
/// start so a key is never readable by others, not even briefly.
fn create_temp(dir: &Path, target: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut attempts = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{base}.tmp-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Encodes DER as PEM with the given label, 64 base64 characters per line.
pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 alphabet is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
