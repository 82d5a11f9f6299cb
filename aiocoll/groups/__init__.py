"""Process groups: how they are made, named, found and sliced from meshes."""
