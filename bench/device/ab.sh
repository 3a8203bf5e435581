# Side by side on one GPU machine: another version of thaw and this tree, each through session.sh
# with its own install, store and $OUT folder. Machines of one kind differ by up to 40 % here, so
# a change is judged only against the version before it measured on the same machine.
# Prepare here: `mkdir base && git archive <commit> | tar -x -C base && (cd base && bash
# bench/device/pack.sh && rm -rf .carry/bin .carry/lib .carry/xtables)` (its wheels only; the
# binaries come from this tree's .carry), then carry [".carry", "base/.carry"] and on the machine:
#   source bench/device/ab.sh; ab base prev "qwen3-8b-outside:2"; ab . new "qwen3-8b-outside:2"
[ -d base/.carry ] && cp -a .carry/bin .carry/lib .carry/xtables base/.carry/
ab() {  # DIR NAME CONFIGS: session.sh of the tree in DIR, results in $OUT/NAME
  rm -rf /tmp/site /tmp/thawbin /var/tmp/thaw-store /var/tmp/gpu-e2e /tmp/restore-logs
  (cd "$1" && OUT=$OUT/$2 SKIP_TESTS=1 SKIP_SPEED=1 CONFIGS="$3" bash bench/device/session.sh) 2>&1 \
    | grep -E "fast: ttft|by_hand: ttft|page cache dropped, from|Medians" | cut -c1-400
}
