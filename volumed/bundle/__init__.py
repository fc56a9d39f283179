"""volumed.bundle"""
