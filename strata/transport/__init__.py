"""How the services talk: named shared-memory regions (shm), tensors by reference or
inline (dataplane), gRPC servers and channels with keys and TLS (rpc), and the
generated stubs of proto/ (wire)."""
