-- Runs once, when the mariadb container initialises an empty data directory.
-- Creates the demo `shop` schema and the account cache-worker replicates with.

CREATE DATABASE IF NOT EXISTS shop CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS shop.users (
    id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(100) NOT NULL,
    email VARCHAR(200) NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'active'
) ENGINE = InnoDB;

-- Demo password only: it must match CACHE_WORKER_SOURCE__PASSWORD in docker-compose.yml.
CREATE USER IF NOT EXISTS 'cache_worker'@'%' IDENTIFIED BY 'cache-worker-demo';
-- Reading the binlog (REPLICATION SLAVE) and its position (REPLICATION CLIENT) are server-wide
-- privileges; row reads for refreshes and schema checks are limited to the cached schema.
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'cache_worker'@'%';
GRANT SELECT ON shop.* TO 'cache_worker'@'%';

INSERT INTO shop.users (name, email, status) VALUES
    ('Ada Lovelace', 'ada@example.com', 'active'),
    ('Grace Hopper', 'grace@example.com', 'active');
