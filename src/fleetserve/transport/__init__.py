"""Transport: the own pooled HTTP/1.1 client on httptools, shared by the gateway and bench."""
