"""Reading a written dataset back and verifying it."""
