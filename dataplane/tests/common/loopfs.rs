//! A real, small file system for full-disk tests (needs root to loop-mount).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A real, small ext4 file system on a loop device, unmounted on drop.
pub struct LoopFs {
    pub mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(megabytes: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let image = dir.path().join("fs.img");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).map_err(|error| error.to_string())?;
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(megabytes << 20))
            .map_err(|error| error.to_string())?;
        let run = |program: &str, args: &[&Path]| -> Result<(), String> {
            let output = Command::new(program).args(args).output().map_err(|error| format!("{program}: {error}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!("{program}: {}", String::from_utf8_lossy(&output.stderr)))
            }
        };
        run("mkfs.ext4", &[Path::new("-q"), Path::new("-F"), &image])?;
        run("mount", &[Path::new("-o"), Path::new("loop"), &image, &mount_point])?;
        Ok(Self { mount_point, _dir: dir })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.mount_point).status().is_ok_and(|status| status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount_point).status();
        }
    }
}
