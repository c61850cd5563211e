# Bring back a GPU run's results and logs: source it, then `gpu_archive ROOT TARBALL EXT...`.
# Only files with the named extensions and under 5 MB, never the fine-tuning folders' adapters,
# checkpoints or snapshots: those come to hundreds of MB a seed, past what a call brings back.
gpu_archive() {
  local root=$1 tarball=$2 files status ext
  shift 2
  local names=(-name "*.$1")
  for ext in "${@:2}"; do names+=(-o -name "*.$ext"); done
  files=$(mktemp)
  (cd "$root" && find . -type f \( "${names[@]}" \) -size -5M -not -path '*/adapter/*' \
    -not -path '*/checkpoint*' -not -path '*/snapshots/*' > "$files") \
    && tar czf "$tarball" -C "$root" -T "$files"
  status=$?
  rm -f "$files"
  return $status
}
