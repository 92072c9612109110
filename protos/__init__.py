"""Protocol buffers of the stanchion.v1 API and their generated Python modules."""
