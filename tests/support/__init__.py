"""Shared helpers of weft's tests: real upstream servers, process control, raw HTTP, configs."""
