export {
  KeyCache,
  hashKey,
  VERIFY_PATH,
  type ApiKeyRecord,
  type Invalidation,
  type KeyCacheOptions,
  type Logger,
  type VerifyError,
  type VerifyResult,
} from "./cache.js";
export { Topology, type TopologyOptions } from "./topology.js";
export {
  Prober,
  decodeCheckpoint,
  encodeProbe,
  encodeReceipt,
  type Checkpoint,
  type Probe,
  type Receipt,
} from "./freshness.js";
export { keyFromRequest, verifyRequest, UNAUTHORIZED_BODY, type HeadersLike } from "./request.js";
