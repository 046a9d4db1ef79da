#!/usr/bin/env bash
# Builds the gateway and inference-worker images as an OCI layout, with no registry and no
# daemon: a root filesystem per binary (the binary, exactly the shared libraries `ldd`
# lists, CA certificates, a non-root user), packed by umoci with the configuration of
# deploy/image/*.Containerfile (user, volume, ports, entrypoint).
#
#   deploy/image/build.sh                 # release binaries -> target/image/oci
#   PROFILE=debug deploy/image/build.sh   # the debug ones
#   BIN_DIR=target/debug OUT=/tmp/img deploy/image/build.sh   # binaries already built (tests)
#   skopeo copy oci:target/image/oci:gateway docker-archive:gateway.tar   # to load elsewhere
#
# With podman or buildah, the Containerfiles build the same images from the root
# filesystems: podman build -f deploy/image/gateway.Containerfile target/image/rootfs-gateway
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${PROFILE:-release}
out=${OUT:-target/image}
command -v umoci >/dev/null || { echo "umoci is missing (Debian: apt-get install umoci)" >&2; exit 1; }
bin_dir=${BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  if [ "$profile" = release ]; then
    cargo build --release -p gateway -p inference-worker
  else
    cargo build -p gateway -p inference-worker
  fi
  bin_dir=target/$profile
fi

rootfs() {
  local bin=$1 dir=$2
  rm -rf "$dir"
  mkdir -p "$dir/usr/local/bin" "$dir/etc/ssl/certs" "$dir/tmp" "$dir/var/lib/gateway" "$dir/models"
  chmod 1777 "$dir/tmp"
  install -m 0755 "$bin_dir/$bin" "$dir/usr/local/bin/$bin"
  # Exactly the libraries the binary links, at the paths the loader looks for them.
  ldd "$bin_dir/$bin" | awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' |
    while read -r lib; do
      mkdir -p "$dir$(dirname "$lib")"
      cp -L "$lib" "$dir$lib"
    done
  printf 'root:x:0:0:root:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  cp -L /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
  chown 65532:65532 "$dir/var/lib/gateway"
}

rm -rf "$out/oci"
mkdir -p "$out"
umoci init --layout "$out/oci"
for bin in gateway inference-worker; do
  dir="$out/rootfs-$bin"
  rootfs "$bin" "$dir"
  umoci new --image "$out/oci:$bin"
  rm -rf "$out/bundle-$bin"
  umoci unpack --image "$out/oci:$bin" "$out/bundle-$bin" >/dev/null
  cp -a "$dir/." "$out/bundle-$bin/rootfs/"
  umoci repack --image "$out/oci:$bin" "$out/bundle-$bin"
  rm -rf "$out/bundle-$bin"
  config=(--config.user 65532:65532 --config.entrypoint "/usr/local/bin/$bin")
  case $bin in
    gateway) config+=(--config.cmd serve --config.volume /var/lib/gateway
                      --config.exposedports 8080/tcp --config.exposedports 8090/tcp
                      --config.exposedports 9464/tcp) ;;
    inference-worker) config+=(--config.exposedports 8081/tcp) ;;
  esac
  umoci config --image "$out/oci:$bin" "${config[@]}"
  echo "[image] $bin: $(du -sh "$dir" | cut -f1) root filesystem -> $out/oci:$bin"
done
umoci gc --layout "$out/oci"
