//! [`Scripts`]: the Lua scripts of the protocol, each touching the keys of one hash tag (one
//! cluster slot) only.

use redis::Script;

pub(super) struct Scripts {
    /// KEYS: res, gen. Returns `{value, pttl, key generation}` or nil.
    pub(super) load: Script,
    /// KEYS: gen (of a group). ARGV: life ms. Returns the generation (0 if none), keeping an
    /// existing one at least `life`.
    pub(super) generation: Script,
    /// KEYS: lock, gen, res. ARGV: fence, lease ms. Returns `{1, '', generation}` when won,
    /// `{0, holder, generation}` when lost, `{2, '', generation}` without taking the lock
    /// when a replay of the key is stored (a leader completed since this flight looked), and
    /// keeps an existing generation at least the lease (it must not expire under the flight).
    /// Idempotent for one fence: if an earlier attempt with this fence timed out on the way
    /// back but took the lock, a retry reports it won.
    pub(super) elect: Script,
    /// KEYS: res, gen, out, lock. ARGV: value, ttl ms, channel, fence, generation at the
    /// election. If the key's generation moved, stores nothing but the revoked mark in `out`,
    /// releases the lock and announces it: `{2, '', 0}`. Otherwise stores the replay unless
    /// one exists (keeping the generation as long) and announces it; returns `{0, '', 0}`,
    /// or `{1, value, pttl}` of the existing replay.
    pub(super) complete_replay: Script,
    /// KEYS: out, lock, gen. ARGV: value, ttl ms, channel, fence, generation at the
    /// election. Stores the flight's outcome (or the revoked mark, returning 2, if the key's
    /// generation moved), announces it, and releases the lock if the fence still holds it: a
    /// request that comes after the outcome elects a new leader instead of following a
    /// flight that has ended (and receiving an outcome that was never meant to be replayed).
    pub(super) complete_flight: Script,
    /// KEYS: res, out, lock. ARGV: value, ttl ms, channel, fence. Withdraws a replay whose
    /// group was invalidated while it was stored: deletes `res` if it still holds this
    /// value, leaves the revoked mark for the followers, releases the lock, announces it.
    pub(super) withdraw: Script,
    /// KEYS: lock. ARGV: fence. Deletes the lock if the fence still holds it.
    pub(super) release: Script,
    /// KEYS: res, out, gen. Returns `{1, value, pttl, generation}` for a replay,
    /// `{0, value, pttl, generation}` for the flight's outcome (`value` may be the revoked
    /// mark), or `{-1, '', 0, generation}`.
    pub(super) outcome: Script,
    /// KEYS: gen, res. ARGV: life ms, completion channel, invalidation channel (empty: none),
    /// message.
    /// Bumps the key's generation (kept at least `life`) and deletes its replay, in one
    /// step: a flight running now can no longer store its result. Wakes its followers (who
    /// see the generation move) and tells every instance.
    pub(super) invalidate: Script,
    /// KEYS: gen, members (of a group). ARGV: life ms. Bumps the group's generation, then
    /// returns its members.
    pub(super) invalidate_group: Script,
}

/// What `out` holds for the followers of a flight whose result was revoked. A sealed value
/// starts with its version byte (2), never with this.
pub(super) const REVOKED: &str = "revoked";

/// Keeps `KEYS[n]` at least `ARGV[m]` ms (Lua, spliced into the scripts).
macro_rules! keep_at_least {
    ($key:literal, $ms:literal) => {
        concat!(
            "if redis.call('PTTL', KEYS[",
            $key,
            "]) < tonumber(ARGV[",
            $ms,
            "]) then ",
            "redis.call('PEXPIRE', KEYS[",
            $key,
            "], ARGV[",
            $ms,
            "]) end\n"
        )
    };
}

/// How the scripts announce a completion on the key's channel `{prefix}:{fp}:done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Announce {
    /// `PUBLISH`: every subscriber of the pattern on every node hears it (standalone,
    /// Sentinel).
    Classic,
    /// `SPUBLISH` (Redis 7): only the subscribers of the key's channel in its shard hear it
    /// (a cluster, where a classic message crosses the cluster bus to every node and reaches
    /// every instance; see `docs/pubsub-cluster.md`).
    Sharded,
}

impl Scripts {
    /// The scripts, announcing completions as `announce` says.
    pub(super) fn new(announce: Announce) -> Self {
        let command = match announce {
            Announce::Classic => "'PUBLISH'",
            Announce::Sharded => "'SPUBLISH'",
        };
        // A completion is announced on the key's own channel, which shares its hash tag.
        let script = |source: &str| Script::new(&source.replace("DONE_PUBLISH", command));
        Self::with(script)
    }

    fn with(script: impl Fn(&str) -> Script) -> Self {
        Self {
            load: script(
                r"local v = redis.call('GET', KEYS[1])
                  if not v then return nil end
                  return {v, redis.call('PTTL', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0')}",
            ),
            generation: script(concat!(
                "local g = redis.call('GET', KEYS[1])\n",
                "if not g then return 0 end\n",
                keep_at_least!(1, 1),
                "return tonumber(g)",
            )),
            elect: script(concat!(
                "local gen = redis.call('GET', KEYS[2])\n",
                "if gen then\n",
                keep_at_least!(2, 2),
                "end\n",
                "gen = tonumber(gen or '0')\n",
                "local holder = redis.call('GET', KEYS[1])\n",
                "if holder == ARGV[1] then return {1, '', gen} end\n",
                "if redis.call('EXISTS', KEYS[3]) == 1 then return {2, '', gen} end\n",
                "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, '', gen} end\n",
                "return {0, holder or redis.call('GET', KEYS[1]) or '', gen}",
            )),
            complete_replay: script(concat!(
                "local gen = redis.call('GET', KEYS[2])\n",
                "if tonumber(gen or '0') ~= tonumber(ARGV[5]) then\n",
                "  redis.call('SET', KEYS[3], 'revoked', 'PX', ARGV[2])\n",
                "  if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end\n",
                "  redis.call(DONE_PUBLISH, ARGV[3], ARGV[4] .. ' revoked')\n",
                "  return {2, '', 0}\n",
                "end\n",
                "local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])\n",
                "if gen then\n",
                keep_at_least!(2, 2),
                "end\n",
                "redis.call(DONE_PUBLISH, ARGV[3], ARGV[4] .. ' replay')\n",
                "if stored then return {0, '', 0} end\n",
                "return {1, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}",
            )),
            complete_flight: script(
                r"local revoked = tonumber(redis.call('GET', KEYS[3]) or '0') ~= tonumber(ARGV[5])
                  if revoked then
                    redis.call('SET', KEYS[1], 'revoked', 'PX', ARGV[2])
                  else
                    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                  end
                  redis.call(DONE_PUBLISH, ARGV[3], ARGV[4] .. ' flight')
                  if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
                  if revoked then return 2 end
                  return 1",
            ),
            withdraw: script(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
                  redis.call('SET', KEYS[2], 'revoked', 'PX', ARGV[2])
                  if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
                  redis.call(DONE_PUBLISH, ARGV[3], ARGV[4] .. ' revoked')
                  return 1",
            ),
            release: script(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
                  return 0",
            ),
            outcome: script(
                r"local gen = tonumber(redis.call('GET', KEYS[3]) or '0')
                  local v = redis.call('GET', KEYS[1])
                  if v then return {1, v, redis.call('PTTL', KEYS[1]), gen} end
                  v = redis.call('GET', KEYS[2])
                  if v then return {0, v, redis.call('PTTL', KEYS[2]), gen} end
                  return {-1, '', 0, gen}",
            ),
            invalidate: script(concat!(
                "redis.call('INCR', KEYS[1])\n",
                keep_at_least!(1, 1),
                "redis.call('DEL', KEYS[2])\n",
                "redis.call(DONE_PUBLISH, ARGV[2], 'invalidated')\n",
                "if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end\n",
                "return 1",
            )),
            invalidate_group: script(concat!(
                "redis.call('INCR', KEYS[1])\n",
                keep_at_least!(1, 1),
                "return redis.call('SMEMBERS', KEYS[2])",
            )),
        }
    }
}
