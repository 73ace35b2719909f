"""Code shipped inside exported checkpoint folders (read by `trust_remote_code` loaders), not
imported by Tessera."""
