"""Price catalog and costing of a replica timeline (pure)."""
